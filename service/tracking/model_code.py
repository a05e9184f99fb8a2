"""The file MLflow logs as the model ("models from code").

Loading the model runs this file instead of unpickling an object. It stays tiny: the model is
serving.ShardpropModel, shipped beside it through code_paths.
"""

import mlflow.models

from shardprop.service.tracking.serving import ShardpropModel

mlflow.models.set_model(ShardpropModel())
