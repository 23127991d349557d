"""Offline tokenizer builders.

Real diffusers pipelines ship their tokenizers as files on the Hugging Face hub. The builders here
construct working tokenizers entirely in memory, with no network access and no files beyond what
the installed packages already contain, so tiny random-weight pipelines (see
:mod:`diffaccel.testing`) and micro models can be built anywhere:

* :func:`clip_tokenizer` -- the real CLIP BPE tokenizer (49408 tokens), rebuilt from the BPE merges
  file that ``open_clip`` bundles. Its ids are identical to OpenAI CLIP's / open_clip's.
* :func:`t5_tokenizer` -- a small, deterministic T5-style Unigram tokenizer (a few hundred to a few
  thousand pieces). It is *not* the real T5 vocabulary; it only has T5's structure (``<pad>`` = 0,
  ``</s>`` = 1, ``<unk>`` = 2, ``▁``-prefixed word pieces, optional ``<extra_id_N>`` sentinels), which
  is all a randomly initialised T5/UMT5 encoder needs.

Example::

    >>> from diffaccel.tokenizers import clip_tokenizer, t5_tokenizer
    >>> clip_tokenizer()("a red circle").input_ids
    [49406, 320, 736, 7117, 49407]
    >>> tok = t5_tokenizer()
    >>> tok("a red circle").input_ids[-1] == tok.eos_token_id
    True
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import pathlib
import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import CLIPTokenizer, T5Tokenizer

__all__ = [
    "CLIP_VOCAB_SIZE",
    "T5_DEFAULT_VOCAB_SIZE",
    "clip_tokenizer",
    "clip_tokenizer_for_words",
    "t5_tokenizer",
    "t5_vocabulary",
]

#: Number of tokens in the CLIP BPE vocabulary (256 bytes, 256 ``</w>`` bytes, 48894 merges, 2 specials).
CLIP_VOCAB_SIZE = 49408
_CLIP_NUM_MERGES = 49152 - 256 - 2
_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

#: Default total vocabulary size of :func:`t5_tokenizer` (special tokens and sentinels included).
T5_DEFAULT_VOCAB_SIZE = 1000


# --------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


def _open_clip_bpe_bytes() -> bytes:
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ImportError(
            "clip_tokenizer() needs the BPE merges file bundled with open_clip; "
            "install it with `pip install open-clip-torch`."
        )
    # Read the file next to open_clip's __init__ without importing open_clip (which pulls in
    # torchvision and friends and takes seconds).
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(pathlib.Path(spec.origin).parent)]
    for location in locations:
        path = pathlib.Path(location) / _CLIP_BPE_FILE
        if path.is_file():
            return path.read_bytes()
    raise FileNotFoundError(f"{_CLIP_BPE_FILE} not found in the open_clip package at {locations}")


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Parse open_clip's BPE file once; the result is shared and must not be mutated."""
    lines = gzip.decompress(_open_clip_bpe_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP uses exactly the first 48894 merges after it.
    merges = tuple(tuple(line.split()) for line in lines[1 : _CLIP_NUM_MERGES + 1])
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:  # pragma: no cover - guards against a changed BPE file
        raise RuntimeError(f"unexpected CLIP vocabulary size {len(vocab)} (want {CLIP_VOCAB_SIZE})")
    return vocab, merges  # type: ignore[return-value]


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Build OpenAI CLIP's BPE tokenizer offline, from the merges file bundled with ``open_clip``.

    The vocabulary is constructed the way CLIP does it: the 256 byte-level unicode characters, their
    ``</w>`` (end-of-word) variants, the 48894 BPE merges, then ``<|startoftext|>`` (49406) and
    ``<|endoftext|>`` (49407). Token ids are therefore identical to those of
    ``openai/clip-vit-large-patch14``'s tokenizer and ``open_clip.tokenizer.SimpleTokenizer``, and the
    tokenizer works with any CLIP text encoder whose ``vocab_size`` is 49408.

    Padding uses ``<|endoftext|>`` by default (as SD 1.x's tokenizer does); SD 2.x and SDXL's second
    tokenizer pad with ``"!"`` (id 0) instead -- pass ``pad_token="!"`` for that. Parsing the BPE file is cached, so
    repeated calls are cheap (~30 ms); each call returns a new, independent tokenizer object.

    Args:
        model_max_length: Maximum sequence length (CLIP's text encoders have 77 positions).
        pad_token: Padding token; must be in the vocabulary (``"<|endoftext|>"`` or ``"!"``).

    Returns:
        A ``transformers.CLIPTokenizer`` (fast, ``tokenizers``-backed).

    Example::

        >>> from diffaccel.tokenizers import clip_tokenizer
        >>> tok = clip_tokenizer()
        >>> tok("a red circle").input_ids
        [49406, 320, 736, 7117, 49407]
        >>> len(tok("a red circle", padding="max_length").input_ids)
        77
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=model_max_length,
        pad_token=pad_token,
    )


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies, in order, to one pre-tokenized (lower-case) ``word``."""
    byte_chars = _bytes_to_unicode()
    symbols = [byte_chars[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    used: list[tuple[str, str]] = []
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        used.append(best)
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return used


def clip_tokenizer_for_words(
    words: list[str], model_max_length: int = 77, pad_token: str = "<|endoftext|>"
) -> tuple[CLIPTokenizer, list[int]]:
    """CLIP's BPE tokenizer cut down to the merges that spell ``words``, and the map to CLIP's ids.

    The vocabulary keeps the 512 byte-level symbols, the results of every merge CLIP applies to
    ``words`` (in CLIP's merge order) and the two special tokens. Since BPE always applies the
    lowest-ranked merge present, and every merge that fires on ``words`` is kept, these words get
    exactly CLIP's tokens; any other word still tokenizes, into shorter pieces. Gathering a CLIP
    text encoder's token-embedding rows with the returned ids gives a text encoder that is
    bit-identical to the original on prompts made of ``words`` (the micro models ship that way:
    a few hundred rows instead of 49408).

    Args:
        words: Lower-case words, as CLIP pre-tokenizes them (letters only, or single digits).
        model_max_length: The tokenizer's padded length.
        pad_token: ``"<|endoftext|>"`` or ``"!"``.

    Returns:
        ``(tokenizer, clip_ids)``: ``clip_ids[i]`` is the full CLIP vocabulary's id of token ``i``.

    Example::

        >>> from diffaccel.tokenizers import clip_tokenizer, clip_tokenizer_for_words
        >>> tok, clip_ids = clip_tokenizer_for_words(["a", "red", "circle"])
        >>> [clip_ids[i] for i in tok("a red circle").input_ids] == clip_tokenizer()("a red circle").input_ids
        True
        >>> len(tok)
        521
    """
    from transformers import CLIPTokenizer

    full_vocab, full_merges = _clip_vocab_and_merges()
    ranks = {merge: rank for rank, merge in enumerate(full_merges)}
    used: set[tuple[str, str]] = set()
    for word in words:
        if not word or word != word.lower() or word.split() != [word]:
            raise ValueError(f"words must be single lower-case words, got {word!r}")
        used.update(_bpe_merges_used(word, ranks))
    merges = sorted(used, key=ranks.__getitem__)
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(tokens)},
        merges=merges,
        model_max_length=model_max_length,
        pad_token=pad_token,
    )
    return tokenizer, [full_vocab[tok] for tok in tokens]


# --------------------------------------------------------------------------------------------------
# T5
# --------------------------------------------------------------------------------------------------

_T5_SPECIALS = ("<pad>", "</s>", "<unk>")

# Common English words (and words frequent in image/video prompts). Order matters: it fixes ids.
_T5_WORDS = """
the of and to a in is it you that he was for on are with as his they be at one have this from or
had by not but what some we can out other were all there when up use your how said an each she
which do their time if will way about many then them write would like so these her long make thing
see him two has look more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made live where after
back little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand port large spell add
even land here must big high such follow act why ask men change went light kind off need house
picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state
keep eye never last let thought city tree cross farm hard start might story saw far sea draw left
late run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain stop once base
hear horse cut sure watch color face wood main enough plain girl usual young ready above ever red
list though feel talk bird soon body dog family direct pose leave song measure door product black
short numeral class wind question happen complete ship area half rock order fire south problem
piece told knew pass since top whole king space heard best hour better true during hundred five
remember step early hold west ground interest reach fast verb sing listen six table travel less
morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead
cry dark machine note wait plan figure star box noun field rest correct able pound done beauty drive
stood contain front teach week final gave green oh quick develop ocean warm free minute strong
special mind behind clear tail produce fact street inch multiply nothing course stay wheel full
force blue object decide surface deep moon island foot system busy test record boat common gold
possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss brought heat
snow tire bring yes distant fill east paint language among photo photograph painting portrait
landscape cat dogs cats circle square triangle sky cloud clouds beautiful cinematic detailed
realistic style art digital render lighting sunset sunrise forest city street flower flowers garden
beach mountains snowy astronaut riding squirrel burger monkey dance dancing video camera close
shot background foreground high quality resolution sharp focus colorful bright orange yellow purple
pink brown gray grey silver woman women girl boy child glass metal stone wooden wood
""".split()

_T5_SUBWORDS = """
s es ed ing er ers est ly tion tions ment ness able ful less al ic ical ive ous y ies ity en ers
re un in dis pre th he an at on nd st ou ar or te ea ng nt ll ee oo ss ch sh ck ph qu wh
""".split()


def _dedupe(items: list[tuple[str, float]]) -> list[tuple[str, float]]:
    seen: set[str] = set()
    out: list[tuple[str, float]] = []
    for piece, score in items:
        if piece not in seen:
            seen.add(piece)
            out.append((piece, score))
    return out


def t5_vocabulary(vocab_size: int = T5_DEFAULT_VOCAB_SIZE, extra_ids: int = 0) -> list[tuple[str, float]]:
    """The deterministic Unigram vocabulary behind :func:`t5_tokenizer`, as ``(piece, score)`` pairs.

    Layout (T5's): ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then ``▁`` and every printable ASCII
    character (so any ASCII text tokenizes without ``<unk>``), then ``▁``-prefixed common English
    words, common sub-words, ``▁``-prefixed single characters, and letter bigrams/trigrams as filler
    up to ``vocab_size``; finally ``extra_ids`` sentinels ``<extra_id_{extra_ids-1}>`` ...
    ``<extra_id_0>`` occupy the last ids, exactly as in T5 (where ``<extra_id_0>`` is the last id).

    Args:
        vocab_size: Total number of entries, specials and sentinels included.
        extra_ids: Number of ``<extra_id_N>`` sentinel tokens (T5 uses 100; pipelines don't need any).

    Example::

        >>> from diffaccel.tokenizers import t5_vocabulary
        >>> vocab = t5_vocabulary(500)
        >>> len(vocab), vocab[0][0], vocab[1][0], vocab[2][0]
        (500, '<pad>', '</s>', '<unk>')
    """
    chars = [c for c in string.printable if not c.isspace()]  # 94 printable ASCII characters
    base: list[tuple[str, float]] = [("▁", -2.0)] + [(c, -10.0) for c in chars]
    minimum = len(_T5_SPECIALS) + len(base) + extra_ids
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} with extra_ids={extra_ids}, got {vocab_size}")

    # Scores are log-probabilities: whole words are cheapest, so known words become one piece and
    # unknown words fall back to sub-words and single characters.
    candidates: list[tuple[str, float]] = []
    candidates += [("▁" + w, -5.0 - 0.001 * i) for i, w in enumerate(_T5_WORDS)]
    candidates += [(s, -7.0 - 0.001 * i) for i, s in enumerate(_T5_SUBWORDS)]
    candidates += [("▁" + c, -8.0) for c in chars]
    letters = string.ascii_lowercase
    candidates += [(a + b, -8.5) for a in letters for b in letters]
    candidates += [("▁" + a + b, -8.2) for a in letters for b in letters]
    candidates += [(a + b + c, -8.8) for a in letters for b in letters for c in letters]

    regular = _dedupe(base + candidates)
    taken = set(_T5_SPECIALS)
    regular = [(p, s) for p, s in regular if p not in taken]
    n_regular = vocab_size - len(_T5_SPECIALS) - extra_ids
    if n_regular > len(regular):
        raise ValueError(f"vocab_size may be at most {len(regular) + len(_T5_SPECIALS) + extra_ids}, got {vocab_size}")
    vocab = [(p, 0.0) for p in _T5_SPECIALS] + regular[:n_regular]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    assert len(vocab) == vocab_size and all(math.isfinite(s) for _, s in vocab)
    return vocab


def t5_tokenizer(
    vocab_size: int = T5_DEFAULT_VOCAB_SIZE,
    model_max_length: int = 512,
    extra_ids: int = 0,
) -> T5Tokenizer:
    """Build a small T5-style Unigram tokenizer offline (not the real T5 vocabulary).

    The vocabulary comes from :func:`t5_vocabulary`: ``<pad>`` = 0, ``</s>`` = 1 (appended to every
    sequence, like T5), ``<unk>`` = 2, ``▁``-prefixed English words and sub-words, and every printable
    ASCII character, so arbitrary English text tokenizes without errors (characters outside ASCII map
    to ``<unk>``). Tokenization is fully deterministic and does not depend on any file or cache.
    ``len(tokenizer) == vocab_size``: use it as the ``vocab_size`` of a random T5/UMT5 encoder.

    Args:
        vocab_size: Total vocabulary size including specials and sentinels (min ~98 + ``extra_ids``).
        model_max_length: Maximum sequence length (real T5 tokenizers use 512).
        extra_ids: Number of ``<extra_id_N>`` sentinel tokens, placed at the end of the vocabulary in
            T5's order (``<extra_id_0>`` has the highest id). T5 uses 100; diffusers pipelines need 0.

    Returns:
        A ``transformers.T5Tokenizer`` (fast, ``tokenizers``-backed).

    Example::

        >>> from diffaccel.tokenizers import t5_tokenizer
        >>> tok = t5_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("a red circle").input_ids)
        ['▁a', '▁red', '▁circle', '</s>']
        >>> tok.decode(tok("a red circle").input_ids, skip_special_tokens=True)
        'a red circle'
    """
    from transformers import T5Tokenizer

    vocab = t5_vocabulary(vocab_size, extra_ids=extra_ids)
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    kwargs = {"additional_special_tokens": sentinels} if sentinels else {}
    tok = T5Tokenizer(vocab=vocab, extra_ids=extra_ids, model_max_length=model_max_length, **kwargs)
    if len(tok) != vocab_size:  # pragma: no cover - guards against transformers behaviour changes
        raise RuntimeError(f"T5 tokenizer has {len(tok)} tokens, expected {vocab_size}")
    return tok
