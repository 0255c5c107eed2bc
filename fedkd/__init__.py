"""fedkd: federated simulation of personalized and knowledge-distillation methods on Flower + Ray."""

__version__ = "0.1.0"
