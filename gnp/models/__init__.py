"""Small Flax models for tests, examples and the mnist1d experiments."""

from gnp.models.small import CNN
from gnp.models.small import MLP
