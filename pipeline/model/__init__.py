"""AnoPLe model code: pure torch (+ open_clip for the frozen backbone). No ray, mlflow, faiss or storage."""
