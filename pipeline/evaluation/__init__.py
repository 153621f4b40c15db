"""How a version is judged: the paper's metrics, streamed (`metrics`), the evidence logged with them (`evidence`:
curves, table, example overlays), and the evaluation and few-shot protocol runs (`run`)."""
