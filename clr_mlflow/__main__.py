"""`python -m clr_mlflow ...`: the `clr-mlflow` command, run from whichever clr_mlflow is
first on sys.path. The MLproject commands use it: `mlflow run` starts them in the project
folder, which `python -m` puts first on sys.path, so a run uses the code it checked out,
not an installed copy."""
from clr_mlflow.app.cli import run_cli

if __name__ == "__main__":
    run_cli()
