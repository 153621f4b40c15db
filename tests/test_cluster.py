from pipeline.cluster import forwarded_env


def test_the_runtime_env_carries_settings_never_credentials():
    env = {"AWS_ENDPOINT_URL": "http://s3", "AWS_REGION": "eu", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ACCESS_KEY_ID": "i",
           "AWS_SESSION_TOKEN": "t", "MLFLOW_TRACKING_URI": "http://m", "MLFLOW_TRACKING_PASSWORD": "p",
           "MLFLOW_TRACKING_TOKEN": "t", "ANOPLE_ROOT": "/r", "HF_HUB_OFFLINE": "1", "HOME": "/root"}
    assert forwarded_env(env) == {"AWS_ENDPOINT_URL": "http://s3", "AWS_REGION": "eu",
                                  "MLFLOW_TRACKING_URI": "http://m", "ANOPLE_ROOT": "/r", "HF_HUB_OFFLINE": "1"}


def test_training_workers_share_the_smallest_eligible_nodes_cores(monkeypatch):
    import ray

    from pipeline.cluster import train_worker_cpus

    def node(cpu, gpu=0.0, alive=True):
        return {"Alive": alive, "Resources": {"CPU": cpu} | ({"GPU": gpu} if gpu else {})}

    nodes = [node(0.0), node(16.0), node(8.0), node(32.0, alive=False), node(8.0, gpu=1.0)]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert train_worker_cpus(1, False) == 8      # the head's 0 CPUs and the dead node are no hosts
    assert train_worker_cpus(3, False) == 8      # one worker per node
    assert train_worker_cpus(6, False) == 4      # two per node on the 8-core ones
    assert train_worker_cpus(100, False) == 1    # never below one
    assert train_worker_cpus(1, True) == 8       # GPU fits size to the GPU nodes
    assert train_worker_cpus(2, False, requested=3) == 3
    monkeypatch.setenv("ANOPLE_WORKER_RESOURCE", "anople_worker")
    nodes.append({"Alive": True, "Resources": {"CPU": 2.0, "anople_worker": 1.0}})
    assert train_worker_cpus(1, False) == 2      # only the worker nodes host workers
    monkeypatch.delenv("ANOPLE_WORKER_RESOURCE")
    nodes[:] = [node(0.0)]                       # a cluster still scaling up
    assert train_worker_cpus(2, True) == 1 and train_worker_cpus(2, False) == 1
