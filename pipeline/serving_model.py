"""The registered MLflow model's code (MLflow "models from code"): the pyfunc class from the installed pipeline
package. MLflow stores this file in the model folder and runs it on load; it imports, it holds nothing else."""
from mlflow.models import set_model

from pipeline.serving import AnoPLePyfunc

set_model(AnoPLePyfunc())
