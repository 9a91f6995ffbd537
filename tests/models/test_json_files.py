"""The shared reader of the small JSON files runs, checkpoints and caches keep (`models.json_files`)."""

import pytest

from models.json_files import read_json_object


class FileProblem(Exception):
    pass


def test_an_object_is_read_with_or_without_a_byte_order_mark(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b'\xef\xbb\xbf{"step": 3}')
    assert read_json_object(path, FileProblem, "a state") == {"step": 3}
    path.write_text('{"step": 4, "name": "caf\u00e9"}', encoding="utf-8")
    assert read_json_object(path, FileProblem, "a state") == {"step": 4, "name": "caf\u00e9"}


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"step": 3}'.encode("latin-1") + b"\xe9", r"not UTF-8 text \(byte 11\); the file is damaged"),
        (b'{\n  "step": 3,,\n}', r"not a state \(invalid JSON at line 2 column 13: "),
        (b"[1, 2]", r"not a state \(expected a JSON object, found list\)"),
        (b"", r"not a state \(invalid JSON at line 1 column 1: "),
    ],
)
def test_a_damaged_file_is_the_callers_error_naming_it(tmp_path, content, message):
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(FileProblem, match=rf"^{path}: {message}"):
        read_json_object(path, FileProblem, "a state")


def test_a_missing_file_is_the_callers_error_naming_it(tmp_path):
    with pytest.raises(FileProblem, match=rf"^{tmp_path / 'gone.json'}: cannot be read"):
        read_json_object(tmp_path / "gone.json", FileProblem, "a state")
