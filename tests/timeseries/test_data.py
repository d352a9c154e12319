"""Data loading, the TSLib split borders, the train-only scaler, windows and bad CSVs."""
import numpy as np
import pandas as pd
import pytest

from ssm_core.cli import UserError
from timeseries.data import (
    infer_freq,
    n_windows,
    prepare,
    read_table,
    season_length,
    select_columns,
    split_borders,
    table_from_frame,
)


def hourly_frame(n, cols=("a", "b", "OT"), seed=0, freq="h"):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=n, freq=freq).strftime("%Y-%m-%d %H:%M:%S")})
    for k, c in enumerate(cols):
        df[c] = rng.normal(k, 1 + k, n).cumsum() / 10
    return df


def write(tmp_path, df, name="data.csv"):
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p


def test_ett_hour_borders_match_tslib():
    L = 96
    # Dataset_ETT_hour: border1s = [0, 12*30*24 - L, 12*30*24 + 4*30*24 - L], border2s = [8640, 11520, 14400]
    b = split_borders(17420, L, 96, "ett-hour")
    assert b == {"train": (0, 8640), "val": (8640 - L, 11520), "test": (11520 - L, 14400)}
    m = split_borders(69680, L, 96, "ett-minute")
    assert m == {"train": (0, 34560), "val": (34560 - L, 46080), "test": (46080 - L, 57600)}


def test_ratio_borders_match_tslib_custom():
    n, L = 1000, 24
    b = split_borders(n, L, 12)
    n_train, n_test = int(n * 0.7), int(n * 0.2)
    n_val = n - n_train - n_test
    assert b == {"train": (0, n_train), "val": (n_train - L, n_train + n_val), "test": (n - n_test - L, n)}


def test_ett_protocol_needs_enough_rows():
    with pytest.raises(UserError, match="at least 14400 rows"):
        split_borders(10000, 96, 96, "ett-hour")


def test_every_test_window_counted_and_scaler_fit_on_train_only():
    L, H = 96, 48
    df = hourly_frame(14400)
    # Make the test period wildly different: a scaler that saw it would have a different mean.
    df.loc[11000:, "OT"] += 1000.0
    prep = prepare(table_from_frame(df), L, H, protocol="ett-hour")
    assert len(prep.datasets["train"]) == 8640 - L - H + 1
    assert len(prep.datasets["val"]) == 2880 - H + 1
    assert len(prep.datasets["test"]) == 2880 - H + 1
    train = df[["a", "b", "OT"]].to_numpy()[:8640]
    np.testing.assert_allclose(prep.scaler.mean_, train.mean(0))
    np.testing.assert_allclose(prep.scaler.scale_, train.std(0))
    # The last test window ends exactly at the last test row (no drop_last, nothing beyond the border).
    _, y = prep.datasets["test"][len(prep.datasets["test"]) - 1]
    expected = (df[["a", "b", "OT"]].to_numpy()[14400 - H:14400] - prep.scaler.mean_) / prep.scaler.scale_
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)
    x0, _ = prep.datasets["test"][0]
    first = (df[["a", "b", "OT"]].to_numpy()[11520 - L:11520] - prep.scaler.mean_) / prep.scaler.scale_
    np.testing.assert_allclose(x0.numpy(), first, rtol=1e-5, atol=1e-5)


def test_modes_pick_columns():
    cols = ["a", "b", "OT"]
    assert select_columns(cols, "M", None) == (cols, cols)
    assert select_columns(cols, "S", None) == (["OT"], ["OT"])
    assert select_columns(cols, "MS", ["b"]) == (cols, ["b"])
    with pytest.raises(UserError, match="--target nope"):
        select_columns(cols, "MS", ["nope"])
    prep = prepare(table_from_frame(hourly_frame(300)), 24, 12, mode="MS", target=["OT"])
    x, y = prep.datasets["train"][0]
    assert x.shape == (24, 3) and y.shape == (12, 1)


def test_date_detection_frequency_and_text_columns(tmp_path):
    df = hourly_frame(200, freq="15min").rename(columns={"date": "when"})
    df["station"] = "north"  # a label column: not a series, left out of "all numeric columns"
    t = read_table(write(tmp_path, df))
    assert t.date_col == "when" and t.columns == ["a", "b", "OT"] and t.freq == "15min"
    assert season_length(t.freq) == 96 and season_length("h") == 24 and season_length("D") == 7
    # A gap defeats pandas' inference; the most common step (a day) is used instead.
    gappy = infer_freq(pd.DatetimeIndex(pd.date_range("2020", periods=10, freq="D").delete(4)))
    assert pd.Timedelta(pd.tseries.frequencies.to_offset(gappy)) == pd.Timedelta("1D")
    assert season_length(gappy) == 7


def test_slash_dates_without_zero_padding(tmp_path):
    """exchange_rate.csv writes dates like `1990/1/1 0:00`: day-first or month-first must not matter."""
    dates = pd.date_range("1990-01-01", periods=40, freq="D")
    text = [f"{d.year}/{d.month}/{d.day} 0:00" for d in dates]
    df = pd.DataFrame({"date": text, "0": np.arange(40.0), "OT": np.ones(40)})
    t = read_table(write(tmp_path, df))
    assert t.date_col == "date" and t.columns == ["0", "OT"] and t.freq == "D"
    assert (t.dates == dates).all()


def test_missing_values_filled_with_warning(tmp_path):
    df = hourly_frame(100)
    df.loc[[3, 4, 50], "a"] = np.nan
    with pytest.warns(UserWarning, match="filled 3 missing values"):
        t = read_table(write(tmp_path, df))
    assert np.isfinite(t.values).all()
    assert t.values[3, 0] == t.values[2, 0]  # forward fill


def test_infinite_values_are_refused_with_column_and_row(tmp_path):
    df = hourly_frame(100)
    df.loc[40, "b"] = np.inf
    df.loc[70, "a"] = -np.inf
    p = write(tmp_path, df)
    assert "inf" in p.read_text().splitlines()[41]   # line 42 of the file, as text a user could type
    with pytest.raises(UserError, match=r"column 'b', row 42 is inf; replace it .* \(2 infinite values in all\)"):
        read_table(p)
    # Only the columns in use count: a forecaster of 'a' alone meets the -inf of row 72.
    with pytest.raises(UserError, match="column 'a', row 72 is -inf"):
        read_table(p, columns=["a"])


@pytest.mark.parametrize("mutate, message", [
    (lambda df: df.assign(a=np.nan), "column 'a' is entirely missing"),
    (lambda df: df[["date"]].assign(name="x"), "no numeric columns"),
    (lambda df: df.iloc[[0, 2, 1] + list(range(3, len(df)))], "not strictly increasing"),
    (lambda df: df.assign(date=["2020-01-01"] * len(df)), "not strictly increasing"),
    (lambda df: df.assign(date=["not a date"] + list(df.date[1:])), "is not a date"),
])
def test_bad_csvs(tmp_path, mutate, message):
    p = write(tmp_path, mutate(hourly_frame(50)))
    with pytest.raises(UserError, match=message):
        read_table(p, date_col="date")


def test_missing_file_and_short_data(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_table(tmp_path / "absent.csv")
    t = read_table(write(tmp_path, hourly_frame(50)))
    with pytest.raises(UserError, match="fewer than --lookback 48 \\+ --horizon 24"):
        prepare(t, 48, 24)
    with pytest.raises(UserError, match="the val split"):
        prepare(t, 8, 8)


def test_window_count_formula():
    assert n_windows(0, 10, 4, 3) == 4
    assert n_windows(0, 6, 4, 3) == 0


def test_etth2_protocol(shared_dir):
    csv = shared_dir / "data" / "ETTh2.csv"
    if not csv.is_file():
        pytest.skip("../shared/data/ETTh2.csv is absent")
    t = read_table(csv)
    assert t.date_col == "date" and t.freq == "h" and len(t.values) == 17420
    assert t.columns == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    prep = prepare(t, 96, 96, protocol="ett-hour")
    assert {k: len(d) for k, d in prep.datasets.items()} == {"train": 8449, "val": 2785, "test": 2785}
    np.testing.assert_allclose(prep.scaler.mean_, t.values[:8640].mean(0))


def test_protocol_auto_follows_the_file_name():
    from timeseries.data import resolve_protocol
    assert resolve_protocol("auto", "../shared/data/ETTh2.csv") == "ett-hour"
    assert resolve_protocol("auto", "ETTm1.csv") == "ett-minute"
    assert resolve_protocol("auto", "exchange_rate.csv") == "ratios"
    assert resolve_protocol("auto", None) == "ratios"
    assert resolve_protocol("ratios", "ETTh1.csv") == "ratios"
