"""From masks to a smaller model: the mask file format, masking a dense model in place (the
reference), and rebuilding a physically smaller one with the kept weights."""
