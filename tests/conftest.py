import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))  # tests import helpers

import keras
import pytest


@pytest.fixture(autouse=True)
def fresh_keras_state():
    """Every test starts from seed 0 and the float32 policy, and leaves them so:
    results do not depend on which tests ran before."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session()
