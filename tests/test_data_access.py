"""Your own data used whole (a cap that cuts it said in one line), and the Hub reached as huggingface_hub reaches it:
through the proxy variables, at HF_ENDPOINT's scheme and port, never when an offline variable is set."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub
import huggingface_hub.constants
import pytest

from data.dataset import prepare_data
from data.sources import hub_unreachable_reason, local_texts

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def stand_in_proxy(monkeypatch) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP proxy that answers every request itself with 200; yields its address and the URLs asked for."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            asked.append(self.path)  # through a proxy, the request line holds the whole URL
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in PROXY_VARIABLES + ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import, under conftest's HF_HUB_OFFLINE=1
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")  # a name that never resolves: only a proxy can answer for it
    huggingface_hub.close_session()  # its client reads the proxy variables when it is made
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        huggingface_hub.close_session()
        server.shutdown()
        server.server_close()


def test_the_hub_is_reached_through_the_proxy_the_environment_names(stand_in_proxy, monkeypatch):
    proxy, asked = stand_in_proxy
    assert hub_unreachable_reason(timeout_s=5) is not None  # no proxy: hub.invalid does not resolve
    monkeypatch.setenv("HTTP_PROXY", proxy)
    huggingface_hub.close_session()
    assert hub_unreachable_reason(timeout_s=5) is None  # the socket probe this replaces called it offline
    assert asked == ["http://hub.invalid/"]
    monkeypatch.setenv("NO_PROXY", "hub.invalid")
    huggingface_hub.close_session()
    assert hub_unreachable_reason(timeout_s=5) is not None and len(asked) == 1


@pytest.mark.parametrize("variable,value,offline", [("HF_HUB_OFFLINE", "1", True), ("TRANSFORMERS_OFFLINE", "yes", True),
                                                     ("HF_DATASETS_OFFLINE", "TRUE", True), ("HF_HUB_OFFLINE", "0", False)])
def test_the_offline_variables_are_read_as_huggingface_hub_reads_them(stand_in_proxy, monkeypatch, variable, value, offline):
    proxy, asked = stand_in_proxy
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv(variable, value)
    reason = hub_unreachable_reason(timeout_s=5)
    assert (reason == f"{variable}={value}") if offline else reason is None
    assert len(asked) == (0 if offline else 1)  # offline: nothing is sent


def _corpus(tmp_path, documents: int = 30) -> str:
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"Document {i}. " + "Some words of text here. " * (3 + i % 5)})
                              for i in range(documents)))
    return str(path)


def test_your_file_is_used_whole_and_a_cutting_cap_is_said_once(config, tmp_path):
    path = _corpus(tmp_path)
    whole_config = config.replace(data_path=path, text_field="body", num_documents=0, max_chars_per_doc=0, max_tokens=0)
    lines: list[str] = []
    whole = prepare_data(whole_config, lines.append)
    assert whole.info["documents"] == whole.info["documents_in_file"] == 30 == len(local_texts(path, "body"))
    assert whole.info["tokens_in_file"] == whole.info["total_tokens"]
    assert not any("cut" in line for line in lines), lines

    lines.clear()
    capped = prepare_data(whole_config.replace(num_documents=10, max_tokens=300), lines.append)
    said = [line for line in lines if "your caps" in line]
    in_file = capped.info["tokens_in_file"]  # the whole file, in this run's tokens (its BPE is fitted to the capped text)
    assert capped.info["documents"] <= 10 and capped.info["total_tokens"] == 300 < in_file
    assert said == [f"Data: your caps (--num-documents 10, --max-tokens 300) cut {path}: used {capped.info['documents']} "
                    f"of 30 documents and 300 of {in_file:,} tokens; set them to 0 to use the whole file."]
    lines.clear()
    prepare_data(whole_config.replace(num_documents=10, max_tokens=300), lines.append)  # from the cache: said again
    assert [line for line in lines if "your caps" in line] == said
