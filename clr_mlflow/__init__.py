"""clr_mlflow: LR range test, cyclical learning rates and MLflow tracking."""
__version__ = "0.1.0"
