"""`training.train` in a process of its own, for tests/conftest.py's `run_training`.

    python tests/train_process.py CONFIG_JSON LOGICAL_CPUS KILL_AT_STEP

Test hooks: TEST_VAL_SCORES (comma-separated validation scores per epoch replace the
measured ones), TEST_KILL_IN_VALIDATION (epoch whose validation is SIGKILLed), and
KILL_AT_STEP >= 0 (a SIGKILL after that global step: a preemption, no clean-up). Steps
are counted here, not read from the optimizer: on JAX its variables live outside Keras
during an epoch. Prints one JSON line: losses, validation, resume point, first and last
global step trained, global batch.
"""

import json
import os
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
cfg_json, cpus, kill_at = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
import keras  # noqa: E402 (KERAS_BACKEND comes from the environment)

if cpus > 1 and keras.backend.backend() == "tensorflow":
    import tensorflow as tf  # logical devices must be set before TensorFlow starts
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * cpus)
from tfcdisc.learn import training  # noqa: E402
from tfcdisc.learn import rundir  # noqa: E402

keras.config.disable_traceback_filtering()
scores = [float(x) for x in os.environ.get("TEST_VAL_SCORES", "").split(",") if x]
kill_in_validation = int(os.environ.get("TEST_KILL_IN_VALIDATION", -1))
real_on_epoch_end = training.ProductEvaluation.on_epoch_end


def on_epoch_end(self, epoch, logs=None):
    if epoch == kill_in_validation:
        os.kill(os.getpid(), signal.SIGKILL)
    real_on_epoch_end(self, epoch, logs)
    if scores:
        logs["val_product_accuracy"] = scores[epoch]


training.ProductEvaluation.on_epoch_end = on_epoch_end


class Steps(keras.callbacks.Callback):
    """Global steps: where the run starts (its backup) plus the steps done since."""

    def __init__(self):
        super().__init__()
        self.first = self.last = None
        self.done = 0

    def on_train_begin(self, logs=None):
        if self.first is None:
            backup = rundir.read_backup(cfg_json["model_dir"])
            steps = cfg_json["steps_per_epoch"]
            self.first = backup["epoch"] * steps + backup["step"] if backup else 0

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        self.last = self.first + self.done
        if self.last == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


steps = Steps()
result = training.train(training.TrainConfig(**cfg_json), callbacks=[steps])
weights = sum(float(abs(keras.ops.convert_to_numpy(w)).sum()) for w in result.model.weights)
print(json.dumps({"loss": result.history.get("loss", []), "validation": result.validation,
                  "weights_abs_sum": weights, "distribution": result.distribution,
                  "resumed": result.resumed,
                  "first_step": steps.first if steps.done else None,
                  "last_step": steps.last, "global_batch_size": result.global_batch_size}))
