"""What people read: MLflow tracking, evaluate records as tags, the comparison report, plots,
and the papers' published figures."""
