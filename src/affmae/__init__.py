"""affmae: masked-autoencoder pretraining of an off-grid AutoFocusFormer (AFFMAE).

Paper: Smerkous, Wang, Najafian, "AFFMAE: Scalable and Efficient Vision Pretraining for Desktop
Graphics Cards". The encoder is a hierarchical AutoFocusFormer (Ziwen et al., CVPR 2023) that only
ever sees visible tokens; the decoder is a point-based deformable cross-attention decoder.

Package layout follows the data flow, imports point one way:
``ops`` (stateless tensor functions and kernels) <- ``layers`` (modules) <- ``models`` (AFF, ViT,
MAE, segmentation) <- ``data`` / ``train`` / ``bench`` / ``analysis`` <- ``cli``.

Shape glossary (used in every shape comment of the package):
    B  batch                         N  tokens (of a stage, or queries of the decoder)
    M  clusters (N = M * m after padding)   m  tokens per cluster (8)
    K  neighbours (keys a query sees, or tokens a sampling point interpolates)
    Kc neighbour clusters per cluster (K = Kc * m)
    H  heads    D  head dim    C  channels    P  patch size (pixels)
    gh, gw  patch grid height and width (image H / P, W / P)

Conventions:
    * ``is_masked``: bool, True = hidden from the encoder. One convention package-wide.
    * Token positions are (x, y) floats in patch units of stage 1 (column, row of the patch grid),
      never rescaled between stages.
"""

__all__ = ["create_model", "list_models", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import affmae.ops` must not build the model registry.
    if name in __all__:
        from affmae.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'affmae' has no attribute {name!r}")
