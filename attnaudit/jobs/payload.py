"""Strict JSON with exact floats, and DataFrames as JSON data: what the item store writes and reads back.

    text = dumps({"loss": float("nan"), "table": frame_payload(df)})   # strict JSON: no NaN tokens
    frame = payload_frame(loads(text)["table"])                        # equal to df, dtypes and index kept

A non-finite float is written as {"$float": "nan" | "inf" | "-inf"} and read back as the float, so float
lists keep their NaN. Tuples and arrays (anything with `tolist`) come back as lists; dict keys must be strings.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def encode(obj: Any) -> Any:
    """A payload as plain JSON data, non-finite floats marked {"$float": ...}; TypeError for anything else."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if obj is None or isinstance(obj, (str, int, float)):
        return obj
    if isinstance(obj, Mapping):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"payload dict keys must be strings (JSON would turn {bad[0]!r} into a string); "
                            f"got a {type(bad[0]).__name__} key.")
        if set(obj) == {"$float"}:
            raise TypeError('a payload dict may not have "$float" as its only key (it marks non-finite floats).')
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if hasattr(obj, "tolist"):                        # numpy / torch arrays and scalars
        return encode(obj.tolist())
    raise TypeError(f"payloads must be JSON data (dict, list, str, int, float, bool, None); got {type(obj).__name__}.")


def _decode_float(d: dict) -> Any:
    return float(d["$float"]) if set(d) == {"$float"} else d


def dumps(obj: Any) -> str:
    """Strict JSON text of a payload; non-finite floats become {"$float": ...}."""
    return json.dumps(encode(obj), allow_nan=False, ensure_ascii=False)


def loads(text: str | bytes) -> Any:
    return json.loads(text, object_hook=_decode_float)


def frame_payload(df) -> dict:
    """A DataFrame as JSON data that `payload_frame` turns back into an equal frame.

    Kept exactly: column names and order, dtypes (float/int/uint/bool, their nullable forms, str/object),
    NaN and missing values, the index and `attrs`. Refused: category, datetime and other dtypes.
    """
    import pandas as pd
    for name, dtype in df.dtypes.items():
        if isinstance(dtype, pd.CategoricalDtype) or dtype.kind not in "biufO":
            raise TypeError(f"frame_payload stores float, int, bool and string columns; column {name!r} "
                            f"has dtype {dtype}. Convert it first (e.g. .astype(str)).")
    plain = lambda values: [None if v is pd.NA else v for v in values]          # noqa: E731
    return {"kind": "pandas.DataFrame",
            "columns": plain(df.columns.tolist()), "columns_dtype": str(df.columns.dtype),
            "dtypes": [str(d) for d in df.dtypes],
            "data": [plain(df.iloc[:, j].tolist()) for j in range(df.shape[1])],
            "index": plain(df.index.tolist()), "index_dtype": str(df.index.dtype), "index_name": df.index.name,
            "attrs": dict(df.attrs)}


def payload_frame(obj: Mapping) -> Any:
    """Inverse of `frame_payload` (also after a save/load round trip)."""
    import pandas as pd
    if not isinstance(obj, Mapping) or obj.get("kind") != "pandas.DataFrame":
        raise ValueError("payload_frame needs a dict made by frame_payload (kind 'pandas.DataFrame'); "
                         f"got {type(obj).__name__}.")
    index = pd.Index(obj["index"], dtype=obj["index_dtype"], name=obj["index_name"])
    df = pd.DataFrame({j: pd.Series(values, dtype=dtype, index=index)
                       for j, (values, dtype) in enumerate(zip(obj["data"], obj["dtypes"]))}, index=index)
    df.columns = pd.Index(obj["columns"], dtype=obj["columns_dtype"])
    df.attrs = dict(obj["attrs"])
    return df
