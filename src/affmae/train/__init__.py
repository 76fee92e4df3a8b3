"""Training: configs, the generic loop (``loop.fit``), pretraining, fine-tuning, the demo.

Imports are lazy so that ``import affmae.train`` stays cheap for the CLI.
"""

_EXPORTS = {
    "TrainConfig": "affmae.train.config",
    "PretrainConfig": "affmae.train.config",
    "TrainJob": "affmae.train.loop",
    "TrainResult": "affmae.train.loop",
    "fit": "affmae.train.loop",
    "run_pretrain": "affmae.train.pretrain",
    "run_demo": "affmae.train.demo",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'affmae.train' has no attribute {name!r}")
