"""The MLflow store under jobs that start together."""

from dgucdir.tracking import SQLITE


def start_on_store(uri: str) -> str:
    """What a job does first with its store: point MLflow at it and find (or create) its experiment."""
    import mlflow

    from dgucdir.tracking import experiment_for, use_store

    use_store(mlflow, uri)
    return experiment_for(mlflow, uri, "together")


def test_jobs_starting_together_on_a_fresh_sqlite_store_all_get_one_experiment(tmp_path):
    # Without the store's lock, MLflow's table creation races: a second job fails with
    # "duplicate column name", or two experiments of one name are attempted.
    from helpers import run_together

    ids = run_together(start_on_store, f"{SQLITE}{tmp_path / 'store' / 'mlruns.db'}", processes=4, timeout=180)
    assert len(set(ids)) == 1
