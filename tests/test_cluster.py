from pipeline.cluster import forwarded_env


def test_the_runtime_env_carries_settings_never_credentials():
    env = {"AWS_ENDPOINT_URL": "http://s3", "AWS_REGION": "eu", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ACCESS_KEY_ID": "i",
           "AWS_SESSION_TOKEN": "t", "MLFLOW_TRACKING_URI": "http://m", "MLFLOW_TRACKING_PASSWORD": "p",
           "MLFLOW_TRACKING_TOKEN": "t", "ANOPLE_ROOT": "/r", "HF_HUB_OFFLINE": "1", "HOME": "/root"}
    assert forwarded_env(env) == {"AWS_ENDPOINT_URL": "http://s3", "AWS_REGION": "eu",
                                  "MLFLOW_TRACKING_URI": "http://m", "ANOPLE_ROOT": "/r", "HF_HUB_OFFLINE": "1"}
