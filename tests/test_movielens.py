"""MovieLens ingest, read in place from ../shared/data/ml-latest-small."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
from conftest import MOVIELENS, read_all

from qarm_dist.config import load_config
from qarm_dist.data import movielens
from qarm_dist.data.ingest import write_movielens
from qarm_dist.io.delta import Tables

pytestmark = pytest.mark.skipif(
    not MOVIELENS.is_dir(), reason="../shared/data/ml-latest-small is not beside the repo"
)


def test_ingest_counts_labels_and_leak_free_tags(root):
    cfg = load_config(root=root)
    out = write_movielens(cfg, str(MOVIELENS), "ml-1")
    assert out["interactions"].rows == 100_836
    assert out["items"].rows == 9_742
    t = Tables(root)
    inter = read_all(t, "interactions")
    ratings = np.loadtxt(MOVIELENS / "ratings.csv", delimiter=",", skiprows=1, usecols=2)
    assert inter["like"].to_numpy().sum() == (ratings >= 4).sum()
    assert (inter["click"].to_numpy() == 1).all()

    # Tags applied in the evaluation window never reach item text.
    cut = movielens.ratings_eval_start(MOVIELENS, cfg.split.eval_fraction)
    tags = pa.csv.read_csv(MOVIELENS / "tags.csv")
    ts, tag = tags["timestamp"].to_numpy(), np.char.lower(np.array(tags["tag"].to_pylist()))
    late_only = set(tag[ts >= cut]) - set(tag[ts < cut])
    assert late_only, "the sample should have tags first used in the eval window"
    items = read_all(t, "items")
    in_text = {
        tag
        for x in items["text"].to_pylist()
        if ". Tags: " in x
        for tag in x.split(". Tags: ")[1].split(", ")
    }
    assert in_text and not (late_only & in_text)
    assert "Tags: pixar" in items.filter(pa.compute.equal(items["item_id"], 1))["text"][0].as_py()


def test_an_incomplete_folder_is_refused_and_writes_nothing(tmp_path, root):
    bad = tmp_path / "ml"
    bad.mkdir()
    shutil.copy(MOVIELENS / "movies.csv", bad / "movies.csv")
    (bad / "ratings.csv").write_text("userId,movieId,stars\n1,1,4\n")
    with pytest.raises(movielens.MovieLensError) as err:
        write_movielens(load_config(root=root), str(bad), "ml-bad")
    msg = str(err.value)
    assert "ratings.csv lacks column(s) rating, timestamp" in msg and "tags.csv is missing" in msg
    assert not Tables(root).exists("items")
