"""Lightning callbacks: thin adapters over the Lightning-free maths in :mod:`lightning_scaling`."""

from lightning_scaling.callbacks.early_stopping import ForecastEarlyStopping
from lightning_scaling.callbacks.forecast import ScalingForecast
from lightning_scaling.callbacks.gns import GradientNoiseScale
from lightning_scaling.callbacks.loss_trajectory import LossTrajectory

__all__ = ["ForecastEarlyStopping", "GradientNoiseScale", "LossTrajectory", "ScalingForecast"]
