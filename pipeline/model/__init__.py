"""AnoPLe model code: pure torch (+ open_clip for the frozen backbone). No ray, mlflow, faiss or storage.

The product's default backbone lives here, not in backbone.py, so that naming it imports no open_clip
(the demo sets HF_HUB_OFFLINE before open_clip and huggingface_hub are first imported)."""

# ViT-B-16-plus-240 (width 896, 12 blocks, 240 px, 15x15 patches) with open_clip's LAION-400M weights:
# the backbone the AnoPLe paper reports.
DEFAULT_BACKBONE = "ViT-B-16-plus-240"
DEFAULT_WEIGHTS = "laion400m_e32"
