"""How a deployment is fitted: its backbone's weights (`weights`), the K normal shots per product (`shots`: also
their banks and thresholds), the memory bank (`bank`), the one prompt-learning loop (`prompts`), the validation
signal on pseudo-anomalies (`validation`), Ray Train around them (`ray_train`, with `job`: what Ray Train's
controller unpickles), and the training run registered in MLflow (`run`)."""
