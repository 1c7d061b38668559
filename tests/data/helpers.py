"""Small file writers shared by the data tests."""
import json


def write_jsonl(path, rows):
    """Rows are dicts (written as JSON) or raw strings (written verbatim, e.g. bad JSON)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path
