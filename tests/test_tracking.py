"""The MLflow store under jobs that start together."""

import multiprocessing as mp

from dgucdir.tracking import SQLITE


def start_on_store(uri: str, barrier, results) -> None:
    """What a job does first with its store: point MLflow at it and find (or create) its experiment."""
    import mlflow

    from dgucdir.tracking import experiment_for, use_store

    barrier.wait(timeout=60)  # every job reaches the fresh store at the same moment
    use_store(mlflow, uri)
    results.put(experiment_for(mlflow, uri, "together"))


def test_jobs_starting_together_on_a_fresh_sqlite_store_all_get_one_experiment(tmp_path):
    # Without the store's lock, MLflow's table creation races: a second job fails with
    # "duplicate column name", or two experiments of one name are attempted.
    uri = f"{SQLITE}{tmp_path / 'store' / 'mlruns.db'}"
    ctx = mp.get_context("spawn")
    jobs = 4
    barrier, results = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=start_on_store, args=(uri, barrier, results)) for _ in range(jobs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * jobs
    ids = {results.get(timeout=5) for _ in range(jobs)}
    assert len(ids) == 1
