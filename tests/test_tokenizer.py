"""The tokenizer against raw sentencepiece, Meta's Llama-2 chat format written out literally, and
loading errors. Uses the conftest tokenizer: BPE, byte fallback, BOS=1, EOS=2, no pad."""

import random
import re

import pytest

from minillama import Tokenizer, load_tokenizer
from minillama.tokenizer import TextStream

spm = pytest.importorskip("sentencepiece")

SENTENCES = [
    "Lily saw a red ball near the river.",
    "Tom carried 37 apples near the old boat.",
    "Anna painted the blue door.  Then she left.",  # two spaces kept (no whitespace normalisation)
    "Hello, World! (unseen capitals and punctuation)",
]
UNSEEN = ["Zoë ☃ 42", "naïve café — 東京 🚀", "tab\tand\nnewline"]  # outside the training data: byte fallback


@pytest.fixture(scope="module")
def tok(spm_path):
    return Tokenizer(spm_path)


@pytest.fixture(scope="module")
def sp(spm_path):
    """The independent reference: sentencepiece itself."""
    return spm.SentencePieceProcessor(model_file=str(spm_path))


def test_special_ids(tok, sp):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    assert tok.vocab_size == tok.n_words == sp.get_piece_size() == 300


def test_bos_eos_flags(tok):
    text = SENTENCES[0]
    ids = tok.encode(text, bos=True, eos=False)
    assert ids[0] == 1 and 2 not in ids and ids.count(1) == 1
    body = tok.encode(text, bos=False, eos=False)
    assert 1 not in body and 2 not in body and len(body) > 0
    assert ids == [1] + body
    assert tok.encode(text, bos=False, eos=True) == body + [2]
    assert tok.encode(text, bos=True, eos=True) == [1] + body + [2]
    assert tok.encode(text) == ids  # Meta's defaults: bos=True, eos=False
    assert tok.encode("", bos=True, eos=True) == [1, 2]


@pytest.mark.parametrize("text", SENTENCES + UNSEEN)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.decode(tok.encode(text, bos=False)) == text


@pytest.mark.parametrize("text", UNSEEN)
def test_unseen_characters_fall_back_to_bytes(tok, sp, text):
    ids = tok.encode(text, bos=False)
    assert sp.unk_id() not in ids  # byte fallback: nothing becomes <unk>
    byte_pieces = [sp.id_to_piece(i) for i in ids if sp.is_byte(i)]
    assert len(byte_pieces) >= len("ë".encode())  # at least one multi-byte character went to bytes
    assert all(re.fullmatch(r"<0x[0-9A-F]{2}>", p) for p in byte_pieces)


@pytest.mark.parametrize("text", SENTENCES + UNSEEN)
def test_ids_equal_raw_sentencepiece(tok, sp, text):
    assert tok.encode(text, bos=False, eos=False) == sp.encode(text)
    assert tok.encode(text, bos=True, eos=True) == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    ids = sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids)


# ---- streaming: tokens arrive one at a time ------------------------------------------------------------
@pytest.mark.parametrize("text", SENTENCES + UNSEEN)
def test_text_stream_gives_the_decoded_whole(tok, text):
    """Fed one token at a time after the BOS, the pieces join to sentencepiece's decoding of all the ids,
    and no piece holds half a character (U+FFFD)."""
    ids = tok.encode(text, bos=True)
    stream = TextStream(tok, ids[:1])
    parts = [stream.add(i) for i in ids[1:]] + [stream.flush()]
    assert "".join(parts) == text == tok.decode(ids)
    assert not any("\ufffd" in p for p in parts)


@pytest.fixture(scope="module")
def shipped():
    """The shipped tokenizer (vocab 2048): whole words such as '▁upon' are pieces."""
    from minillama.course.paths import tiny_model_dir

    return load_tokenizer(tiny_model_dir())


def test_text_stream_keeps_the_space_of_a_new_word(shipped):
    """sentencepiece decodes the piece '▁upon' alone as 'upon'; after the prompt 'Once' it is ' upon'."""
    prompt, whole = shipped.encode("Once", bos=True), shipped.encode("Once upon", bos=True)
    assert whole[:-1] == prompt and shipped.sp.id_to_piece(whole[-1]) == "\u2581upon"
    assert shipped.decode(whole[-1:]) == "upon"  # what printing each token's own decoding showed
    assert TextStream(shipped, prompt).add(whole[-1]) == " upon"


def test_text_stream_holds_back_half_a_character(shipped):
    ids = shipped.encode("a\u6771", bos=False)  # "東" is not in the vocabulary: three byte tokens
    assert [shipped.sp.id_to_piece(i) for i in ids] == ["\u2581a", "<0xE6>", "<0x9D>", "<0xB1>"]
    stream = TextStream(shipped, [shipped.bos_id])
    assert [stream.add(i) for i in ids] == ["a", "", "", "\u6771"]
    stream.add(ids[1])  # a dangling first byte is handed out by flush(), as sentencepiece decodes it
    assert stream.flush() == "\ufffd"


# ---- chat template: Meta's Llama-2 format, written out literally --------------------------------------
def open_turn(sp, text):
    """An unanswered user turn: BOS, no EOS."""
    return [1] + sp.encode(text)


def finished_turn(sp, text):
    """A user turn with its answer: BOS ... EOS."""
    return [1] + sp.encode(text) + [2]


def test_chat_system_and_user(tok, sp):
    dialog = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who saw the ball?"}]
    expected = open_turn(sp, "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWho saw the ball? [/INST]")
    assert tok.encode_chat(dialog) == expected


def test_chat_user_only(tok, sp):
    dialog = [{"role": "user", "content": "Who saw the ball?"}]
    assert tok.encode_chat(dialog) == open_turn(sp, "[INST] Who saw the ball? [/INST]")


def test_chat_multi_turn(tok, sp):
    dialog = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Who saw the ball?"},
        {"role": "assistant", "content": "Lily."},
        {"role": "user", "content": "Where?"},
    ]
    expected = finished_turn(sp, "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWho saw the ball? [/INST] Lily. ")
    expected += open_turn(sp, "[INST] Where? [/INST]")
    ids = tok.encode_chat(dialog)
    assert ids == expected
    assert ids.count(1) == 2 and ids.count(2) == 1


def test_chat_strips_user_and_answer_like_meta(tok, sp):
    dialog = [{"role": "user", "content": "  Hi there \n"}, {"role": "assistant", "content": " Hello. "},
              {"role": "user", "content": "\tBye "}]
    expected = finished_turn(sp, "[INST] Hi there [/INST] Hello. ") + open_turn(sp, "[INST] Bye [/INST]")
    assert tok.encode_chat(dialog) == expected


def msgs(*roles):
    return [{"role": r, "content": f"message {i}"} for i, r in enumerate(roles)]


@pytest.mark.parametrize("roles", [
    ("assistant", "user"),             # assistant first
    ("user", "user"),                  # two users in a row
    ("user", "assistant"),             # ends with the assistant
    ("system",),                       # system only
    ("system", "assistant"),           # system, then no user
    ("system", "assistant", "user"),
    ("system", "system", "user"),
    ("user", "assistant", "system", "user"),  # system in the middle
    (),                                # empty dialog
])
def test_chat_bad_roles(tok, roles):
    with pytest.raises(ValueError, match=re.escape(f"Chat roles {list(roles)} are invalid")):
        tok.encode_chat(msgs(*roles))


# ---- loading and saving ------------------------------------------------------------------------------
def test_load_from_directory(spm_path, sp):
    tok = load_tokenizer(spm_path.parent)
    assert tok.path == spm_path
    assert tok.encode(SENTENCES[1], bos=False) == sp.encode(SENTENCES[1])
    assert load_tokenizer(spm_path, vocab_size=300).vocab_size == 300


def test_wrong_vocab_size(spm_path):
    with pytest.raises(ValueError, match=r"has 300 tokens but the model's vocab_size is 32000"):
        load_tokenizer(spm_path, vocab_size=32000)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.model"))):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.model"))):
        load_tokenizer(tmp_path)  # a directory without tokenizer.model


@pytest.mark.parametrize("content", [random.Random(0).randbytes(2000), b""], ids=["random", "empty"])
def test_garbage_file(tmp_path, content):
    f = tmp_path / "tokenizer.model"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(f)) + " is not a readable sentencepiece model"):
        load_tokenizer(f)


def test_save_round_trips(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.model")
    again = load_tokenizer(tmp_path)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (1, 2, -1, 300)
    for text in SENTENCES + UNSEEN:
        assert again.encode(text, bos=True, eos=True) == tok.encode(text, bos=True, eos=True)
    assert (tmp_path / "tokenizer.model").read_bytes() == tok.path.read_bytes()
