"""Exact offline tokenizers and the strict estimate built on them, against real provider counts.

The corpus (tests/estimation_corpus.py, 400 requests: English, CJK, Arabic, Russian, code, JSON,
tool schemas, tool calls, images, multi-turn) is counted by tests/provider_reference.py: OpenAI's
published counting rules on the messages langchain-openai sends, and mistral-common's own
``encode_chat_completion``. Strict must never be below; its median over-count must be <= 1.10x.
"""

from __future__ import annotations

import gzip
import os
import socket
import statistics

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from langchain_budgetguard import tokenizers
from langchain_budgetguard.estimate import StrictEstimator, TypicalEstimator
from langchain_budgetguard.images import image_size, image_tokens
from langchain_budgetguard.tokenizers import (exact_family, mistral_tokenizer_name, openai_encoding_name,
                                              render_openai_tool)

from .estimation_corpus import build_corpus, jpeg_data_url, png_data_url
from .provider_reference import openai_image, openai_reference, reference_count


def _require(family: str) -> None:
    if not tokenizers.available_families().get(family):
        if os.environ.get("CI"):
            pytest.fail(f"{family} is not loadable: the [tokenizers] extra must be installed in CI")
        pytest.skip(f"{family} not installed (pip install 'langchain-budgetguard[tokenizers]')")


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(400)


# -- loading ----------------------------------------------------------------------------------

def test_openai_encodings_load_offline_and_count_known_tokens(monkeypatch):
    _require("o200k_base")
    _require("cl100k_base")
    tokenizers._openai_family.cache_clear()
    tokenizers.exact_family.cache_clear()

    def no_network(*args, **kwargs):
        raise AssertionError("a tokenizer tried to reach the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    cl100k, o200k = exact_family("gpt-4"), exact_family("gpt-4o")
    assert cl100k.name == "cl100k_base" and o200k.name == "o200k_base"
    # tiktoken's README: "tiktoken is great!" -> [83, 1609, 5963, 374, 2294, 0]
    assert cl100k.count("tiktoken is great!") == 6
    assert o200k.count("hello world") == 2
    assert cl100k.count("") == o200k.count("") == 0
    # Special-token text is read as plain text, as the API does with user text.
    assert o200k.count("<|endoftext|>") > 1


def test_a_rank_file_with_the_wrong_hash_is_never_used(monkeypatch, tmp_path):
    _require("o200k_base")
    good = next(p for p in tokenizers._rank_file_candidates("o200k_base") if p.exists())
    raw = gzip.decompress(good.read_bytes()) if good.suffix == ".gz" else good.read_bytes()
    tampered = tmp_path / "o200k_base.tiktoken"
    lines = raw.splitlines()
    lines[1000], lines[1001] = lines[1001].split()[0] + b" 1000", lines[1000].split()[0] + b" 1001"  # swap ranks
    tampered.write_bytes(b"\n".join(lines))
    monkeypatch.setattr(tokenizers, "_rank_file_candidates", lambda name: [tampered])
    assert tokenizers._load_ranks("o200k_base") is None
    monkeypatch.setattr(tokenizers, "_rank_file_candidates", lambda name: [tmp_path / "missing", good])
    assert tokenizers._load_ranks("o200k_base") is not None


def test_model_names_map_to_tokenizers_conservatively():
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1-nano", "o1", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini",
                  "chatgpt-4o-latest", "openai/gpt-4o", "ft:gpt-4o-mini:acme::abc123", "GPT-4O"):
        assert openai_encoding_name(model) == "o200k_base", model
    for model in ("gpt-4", "gpt-4-turbo", "gpt-3.5-turbo", "gpt-35-turbo"):
        assert openai_encoding_name(model) == "cl100k_base", model
    # Not OpenAI's API tokenization, or not knowable: the byte bound stays.
    for model in ("gpt-oss-120b", "gpt-4o-realtime-preview", "claude-3-5-sonnet", "gemini-2.0-flash",
                  "my-azure-deployment", "groq/gpt-4o", "", None, "llama-3.1-70b"):
        assert openai_encoding_name(model) is None, model
    assert mistral_tokenizer_name("open-mistral-nemo") == "v3-tekken"
    assert mistral_tokenizer_name("mistral-large-2411") == "v7"
    assert mistral_tokenizer_name("mistralai/codestral-2405") == "v3"
    for model in ("mistral-large-latest", "mistral-small-latest", "mistral-medium-2505", "magistral-medium"):
        assert mistral_tokenizer_name(model) is None, model  # aliases move; unlisted models are unknown


def test_long_texts_are_tokenized_once(monkeypatch):
    _require("o200k_base")
    family = exact_family("gpt-4o")
    calls = []
    real = family._encode_len
    object.__setattr__(family, "_encode_len", lambda text: calls.append(len(text)) or real(text))
    try:
        history = "A long message re-sent every turn. " * 400
        first = family.count(history)
        assert family.count(history) == first and family.count(history[:-1] + "!") >= 1
        assert calls == [len(history), len(history)]  # the identical text was not tokenized again
        probe = "a short text only this test sends"
        assert family.count(probe) == family.count(probe) and calls[-1:] == [len(probe)]  # short: by itself
    finally:
        object.__setattr__(family, "_encode_len", real)


# -- strict against the providers' counts -------------------------------------------------------

MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4-turbo", "open-mistral-nemo", "mistral-large-2411", "codestral-2405",
          "mistral-small-2402", "mistral-medium-2312"]


@pytest.mark.parametrize("model", MODELS)
def test_strict_is_never_below_the_provider_and_tight(model, corpus):
    family = exact_family(model)
    if family is None:
        _require("o200k_base" if model.startswith("gpt") else f"mistral:{mistral_tokenizer_name(model)}")
    strict = StrictEstimator()
    ratios, worst = [], (0.0, None)
    for i, req in enumerate(corpus):
        reference = reference_count(req, model)
        if reference is None:  # mistral-common refuses the request (images, non-ASCII tool names)
            continue
        estimate = strict.input_tokens(req.messages, req.tools or None, model=model)
        assert estimate >= reference, f"request {i} ({req.kind}, {req.lang}): {estimate} < {reference}"
        ratios.append(estimate / reference)
        worst = max(worst, (estimate / reference, f"{req.kind}/{req.lang}"))
    assert len(ratios) >= (280 if model == "mistral-medium-2312" else 300)  # v1 takes no tools
    median = statistics.median(ratios)
    print(f"{model}: n={len(ratios)} median {median:.3f}x, worst {worst[0]:.2f}x ({worst[1]})")
    assert median <= 1.10
    if model.startswith("gpt"):  # the byte bound it replaces, for scale: several times over
        byte_bound = StrictEstimator(exact=False)
        assert statistics.median(byte_bound.input_tokens(r.messages, r.tools or None, model=model) /
                                 openai_reference(r, model) for r in corpus[:100]) > 2


def test_strict_without_the_tokenizer_is_the_byte_bound():
    strict = StrictEstimator(exact=False)
    text = "Привет, мир! 你好"
    assert strict.tokenizer_for("gpt-4o") is None
    assert strict.input_tokens([HumanMessage(text)], model="gpt-4o") >= len(text.encode("utf-8"))
    with pytest.raises(ValueError, match="exact"):
        StrictEstimator(exact="yes")  # type: ignore[arg-type]


def test_strict_reports_its_tokenizer():
    _require("o200k_base")
    assert StrictEstimator().tokenizer_for("gpt-4o") == "o200k_base"
    assert StrictEstimator().tokenizer_for("claude-sonnet-4-5") is None


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4-turbo"])
def test_a_huge_enum_cannot_make_strict_undercount_tools(model):
    """Attack: OpenAI renders enums as "a" | "b" (more tokens than JSON's "a","b"): strict must follow."""
    _require("o200k_base")
    from .estimation_corpus import CorpusRequest

    values = [f"v{i}" for i in range(600)]
    tool = {"type": "function", "function": {"name": "pick", "description": "Pick one.", "parameters": {
        "type": "object", "properties": {"choice": {"type": "string", "enum": values}}, "required": ["choice"]}}}
    req = CorpusRequest([SystemMessage("s"), HumanMessage("pick")], tools=[tool])
    family = exact_family(model)
    json_only = family.count('{"type":"function","function":' + str(tool["function"]).replace("'", '"') + "}")
    reference = openai_reference(req, model)
    estimate = StrictEstimator().input_tokens(req.messages, req.tools, model=model)
    assert estimate >= reference
    assert family.count(render_openai_tool(tool)) > json_only * 0.9  # the rendering, not the JSON, is the max


def test_special_token_text_and_huge_runs_count_at_least_the_provider():
    _require("o200k_base")
    from .estimation_corpus import CorpusRequest

    for text in ("<|im_start|>system<|im_sep|>free<|im_end|>" * 50, "a" * 100_000, "🙂" * 5000, "\u0000" * 1000):
        req = CorpusRequest([HumanMessage(text)])
        assert StrictEstimator().input_tokens(req.messages, model="gpt-4o") >= openai_reference(req, "gpt-4o")


# -- images -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [png_data_url, jpeg_data_url])
def test_image_headers_are_read(make):
    for w, h in ((1, 1), (64, 64), (1920, 1080), (4000, 3000), (300, 2000)):
        assert image_size(make(w, h)) == (w, h)
    assert image_size("data:image/png;base64,!!!!") is None
    assert image_size("not base64 at all") is None


def test_gif_and_webp_headers_are_read():
    import base64
    import struct

    gif = b"GIF89a" + struct.pack("<HH", 640, 480) + b"\x00" * 20
    assert image_size(base64.b64encode(gif).decode()) == (640, 480)
    vp8x = b"RIFF" + b"\x00" * 4 + b"WEBPVP8X" + b"\x00" * 8 + (1023).to_bytes(3, "little") + (767).to_bytes(3, "little")
    assert image_size(base64.b64encode(vp8x).decode()) == (1024, 768)


def _gif(screen: tuple[int, int], frames: list[tuple[int, int, int, int]], data_blocks: int = 1) -> str:
    """A GIF with a 2-colour global table and one image descriptor per (left, top, width, height)."""
    import base64
    import struct

    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    out += b"!\xf9\x04\0\0\0\0\0"  # graphic control extension
    for frame in frames:
        out += b"," + struct.pack("<HHHHB", *frame, 0) + b"\x02" + b"\x01\x00" * data_blocks + b"\0"
    return base64.b64encode(out + b";").decode()


def test_a_gif_is_sized_by_its_frames_not_only_its_logical_screen():
    """A 16x16 logical screen with a 2000x2000 frame: decoders (Pillow) render 2000x2000, the guard
    read 16x16 from the screen descriptor (gpt-4.1-mini: 20 tokens held instead of 2,530)."""
    assert image_size(_gif((16, 16), [(0, 0, 2000, 2000)])) == (2000, 2000)
    assert image_size(_gif((64, 64), [(0, 0, 64, 64), (100, 40, 50, 50)])) == (150, 90)  # a later frame
    assert image_size(_gif((640, 480), [(0, 0, 10, 10)])) == (640, 480)  # the screen, when larger
    strict = StrictEstimator()
    for model in ("gpt-4.1-mini", "claude-sonnet-4-5"):
        def tokens(gif: str) -> int:
            return strict.input_tokens([HumanMessage([{"type": "image_url", "image_url": {
                "url": f"data:image/gif;base64,{gif}"}}])], model=model)
        assert tokens(_gif((16, 16), [(0, 0, 2000, 2000)])) == tokens(_gif((2000, 2000), [(0, 0, 2000, 2000)]))
        assert tokens(_gif((16, 16), [(0, 0, 2000, 2000)])) > 10 * tokens(_gif((16, 16), [(0, 0, 16, 16)]))


def test_a_gif_agrees_with_pillow():
    PIL = pytest.importorskip("PIL.Image")
    import base64
    import io

    buf = io.BytesIO()
    PIL.new("P", (300, 200)).save(buf, "GIF")
    raw = bytearray(buf.getvalue())
    raw[6:10] = (16).to_bytes(2, "little") * 2  # the logical screen says 16x16
    im = PIL.open(io.BytesIO(bytes(raw)))
    im.load()
    assert image_size(base64.b64encode(bytes(raw)).decode()) == im.size == (300, 200)


def _png(*chunks: tuple[bytes, bytes]) -> str:
    import base64
    import struct
    import zlib

    body = b"".join(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
                    for kind, data in chunks)
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + body).decode()


def _ihdr(width: int, height: int) -> tuple[bytes, bytes]:
    import struct

    return b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)


def test_a_png_is_sized_by_its_ihdr_wherever_it_is():
    """An ancillary chunk ahead of IHDR: the guard read its first 8 bytes as the size (16x16), Pillow
    skips it and decodes at the IHDR's 2000x1500; with two IHDRs Pillow takes the last."""
    import struct

    decoy = struct.pack(">II", 16, 16)
    assert image_size(_png((b"tEXt", decoy + b"k\0v"), _ihdr(2000, 1500), (b"IDAT", b"x"))) == (2000, 1500)
    assert image_size(_png(_ihdr(16, 16), _ihdr(2000, 1500), (b"IDAT", b"x"))) == (2000, 1500)
    assert image_size(_png(_ihdr(2000, 1500), (b"IDAT", b"x"), _ihdr(16, 16))) == (2000, 1500)  # after IDAT: unread
    assert image_size(_png(_ihdr(16, 16), (b"tEXt", b"x" * 100))) is None  # no image data in view: unknown


def test_a_png_agrees_with_pillow():
    PIL = pytest.importorskip("PIL.Image")
    import base64
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    PIL.new("RGB", (300, 200)).save(buf, "PNG")
    raw = buf.getvalue()
    decoy = b"abCd" + struct.pack(">II", 16, 16)
    raw = raw[:8] + struct.pack(">I", 8) + decoy + struct.pack(">I", zlib.crc32(decoy)) + raw[8:]
    im = PIL.open(io.BytesIO(raw))
    im.load()
    assert image_size(base64.b64encode(raw).decode()) == im.size == (300, 200)


def _sof(width: int, height: int) -> bytes:
    import struct

    return b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"


def _jpeg(*segments: bytes) -> str:
    import base64
    import struct

    sos = b"\xff\xda" + struct.pack(">H", 12) + b"\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    return base64.b64encode(b"\xff\xd8" + b"".join(segments) + sos + b"\x00" * 64 + b"\xff\xd9").decode()


def test_a_jpeg_is_read_as_decoders_read_its_markers():
    """A stuffed FF00 ahead of an APP1 whose body holds a 16x16 SOF: the guard took FF00 for a
    segment, jumped by the next two bytes into the APP1 body and read 16x16; Pillow and libjpeg
    skip FF00 and the APP1, and decode at the real SOF (2000x1500)."""
    import struct

    decoy = b"\xff\xe1" + struct.pack(">H", 2 + 19) + _sof(16, 16)
    assert image_size(_jpeg(b"\xff\x00" + struct.pack(">H", 6), decoy, _sof(2000, 1500))) == (2000, 1500)
    assert image_size(_jpeg(b"\xff\xff\xff", _sof(2000, 1500))) == (2000, 1500)  # fill bytes
    assert image_size(_jpeg(b"\x00\x17", _sof(2000, 1500))) == (2000, 1500)  # junk between segments
    assert image_size(_jpeg(_sof(16, 16), _sof(2000, 1500))) == (2000, 1500)  # two frames: the larger
    import base64

    no_scan = b"\xff\xd8" + _sof(16, 16) + b"\xff\xe1" + struct.pack(">H", 400) + b"\x00" * 100
    assert image_size(base64.b64encode(no_scan).decode()) is None  # no scan in view: a later SOF may follow


def test_a_jpeg_agrees_with_pillow():
    PIL = pytest.importorskip("PIL.Image")
    import base64
    import io
    import struct

    buf = io.BytesIO()
    PIL.new("RGB", (300, 200)).save(buf, "JPEG")
    raw = buf.getvalue()
    decoy = b"\xff\xe1" + struct.pack(">H", 2 + 19) + _sof(16, 16)
    raw = raw[:2] + b"\xff\x00" + struct.pack(">H", 6) + decoy + raw[2:]
    im = PIL.open(io.BytesIO(raw))
    im.load()
    assert image_size(base64.b64encode(raw).decode()) == im.size == (300, 200)


def test_a_hostile_gif_scan_is_bounded():
    """Too many frames or sub-blocks: the scan gives up (None: the family's worst case), quickly."""
    import time

    from langchain_budgetguard import images

    start = time.perf_counter()
    assert image_size(_gif((16, 16), [(0, 0, 16, 16)] * (images._GIF_MAX_FRAMES + 1))) is None
    assert image_size(_gif((16, 16), [(0, 0, 16, 16)], data_blocks=images._GIF_MAX_BLOCKS + 1)) is None
    assert image_size(_gif((16, 16), [(0, 0, 16, 16)] * images._GIF_MAX_FRAMES)) == (16, 16)
    assert time.perf_counter() - start < 2


def test_openai_tile_formula_examples():
    # OpenAI's published examples: 1024x1024 high = 765; 2048x4096 high = 1105; low = 85.
    assert image_tokens("openai-tiles", 1024, 1024, False, 1600) == 765
    assert image_tokens("openai-tiles", 2048, 4096, False, 1600) == 1105
    assert image_tokens("openai-tiles", 4096, 8192, True, 1600) == 85
    assert image_tokens("gpt-4o-mini", 1024, 1024, False, 48_169) == 2833 + 4 * 5667
    # Whether a small image is scaled up is not documented: the bound assumes it is.
    assert image_tokens("openai-tiles", 64, 64, False, 1600) == 765
    assert image_tokens("openai-tiles", 64, 64, False, 1600, bound=False) == 255
    # Never above the family's worst case, never below the provider's formula.
    for w in (1, 100, 512, 513, 767, 768, 769, 1024, 2047, 2048, 2049, 5000, 12000):
        for h in (1, 100, 512, 800, 2048, 3000, 9000):
            for low in (False, True):
                for family, model in (("openai-tiles", "gpt-4o"), ("gpt-4o-mini", "gpt-4o-mini")):
                    worst = 1600 if family == "openai-tiles" else 48_169
                    n = image_tokens(family, w, h, low, worst)
                    assert openai_image(model, w, h, "low" if low else "high") <= n <= worst


def test_image_by_url_or_unreadable_counts_the_worst_case():
    strict = StrictEstimator()
    url = [HumanMessage([{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}])]
    inline = [HumanMessage([{"type": "image_url", "image_url": {"url": png_data_url(512, 512)}}])]
    assert strict.input_tokens(url, model="gpt-4o") - strict.input_tokens(inline, model="gpt-4o") > 500
    broken = [HumanMessage([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 400}}])]
    assert strict.input_tokens(broken, model="gpt-4o") >= strict.input_tokens(url, model="gpt-4o") - 50


def test_typical_uses_the_exact_tokenizer_without_margin(corpus):
    _require("o200k_base")
    typical = TypicalEstimator(calibrate=False)
    ratios = [typical.input_tokens(r.messages, r.tools or None, model="gpt-4o") / openai_reference(r, "gpt-4o")
              for r in corpus if r.kind not in ("image", "tools", "tool_turns")]
    assert 0.97 <= statistics.median(ratios) <= 1.05


def test_mistral_safe_prompt_is_reserved():
    if exact_family("open-mistral-nemo") is None:
        _require("mistral:v3-tekken")
    from langchain_core.runnables import RunnableBinding

    class ChatMistralAI:  # the fields the estimator reads, without the integration installed
        model = "open-mistral-nemo"
        safe_mode = True

    plain = StrictEstimator().input_tokens([HumanMessage("hi")], model="open-mistral-nemo")
    safe = StrictEstimator().input_tokens([HumanMessage("hi")], model=ChatMistralAI())
    assert safe - plain == 64
    from langchain_core.language_models import FakeListChatModel

    class Named(FakeListChatModel):
        model: str = "open-mistral-nemo"

    bound = RunnableBinding(bound=Named(responses=["x"]), kwargs={"safe_prompt": True})
    assert StrictEstimator().input_tokens([HumanMessage("hi")], model=bound) == safe


def test_claude_images_of_known_size_are_bounded_by_their_formula():
    strict = StrictEstimator()
    small = [HumanMessage([{"type": "image", "base64": png_data_url(200, 200).split(",")[1], "mime_type": "image/png"}])]
    url = [HumanMessage([{"type": "image", "url": "https://example.com/a.png"}])]
    n_small = strict.input_tokens(small, model="claude-sonnet-4-5")
    assert 200 * 200 / 750 <= n_small - strict.input_tokens([HumanMessage([])], model="claude-sonnet-4-5")
    assert n_small < strict.input_tokens(url, model="claude-sonnet-4-5")


def test_counts_of_texts_seen_before_are_kept_within_a_bound() -> None:
    calls: list[str] = []

    def encode_len(text: str) -> int:
        calls.append(text)
        return len(text.split())

    cache = tokenizers._CountCache()
    cache.short_chars = 100
    family = tokenizers.ExactFamily("test", "openai", tokenizers.OPENAI_FORMAT, encode_len, cache)
    system = "You are a careful assistant."  # sent again on every call
    assert [family.count(system) for _ in range(5)] == [5] * 5 and calls == [system]
    for i in range(40):  # 40 other texts of ~10 chars: more than 100 chars in all
        assert family.count(f"text {i:5d}") == 2
    assert cache._short_size <= 100 and system not in cache._short  # the oldest went first
    assert family.count(system) == 5 and calls.count(system) == 2  # counted again, exactly
    long = "word " * 1000  # kept by digest, not by itself
    assert family.count(long) == family.count(long) == 1000 and calls.count(long) == 1
    assert long not in cache._short
