"""Identity tokens: the words that make two near-identical questions ask about different things.

Why: a dense embedder puts "O que diz o Art. 72?" and "O que diz o Art. 75?" at cosine 0.96, so a
cache keyed by dense similarity alone answers the second with the first's answer. Embeddings
smear exactly the tokens that carry identity (numbers, article and section numbers, dates, codes,
versions, names) and polarity (negations). This module extracts them in a language-neutral way so
the ``hybrid`` guard can demand that they agree:

* **numbers** (in text order: "05/06" is not "06/05", "Art. 72, § 5" not "Art. 5, § 72"):
  signed digit groups ("-10" is not "10", ".5" is "0.5"), normalised so that "1.000" (pt),
  "1,000" (en) and "1000" agree and "05" equals "5" (dates), but "3.10" and "3.1" (versions)
  do not; spelled-out numbers (one..twenty, hundred, dois..vinte), ordinals ("first" = "1st",
  "segunda" = 2), numbers written as one symbol ("½", "¼", "²", "Ⅻ"), month names (May 2023 =
  05/2023 = maio de 2023) and roman numerals after a legal/structural marker ("inciso IV" =
  "inciso 4").
* **codes** (a multiset): tokens mixing letters and digits ("E11000", "CVE-2021-44228", "72-A"),
  letters after markers ("alínea b", "Annex A"), relative days ("today", "amanhã"), symbols
  ("🍕", "🇫🇷": an embedder reads them as one unknown token), and the order of two names with
  a direction between them ("Celsius to Fahrenheit", "Python faster than Java": swapped, they
  ask the opposite).
* **contrasts**: words whose opposite asks the opposite question ("minimum" / "maximum",
  "before" / "after", "increase" / "decrease", "antes" / "depois"); two queries naming opposite
  sides disagree, one naming a side and the other none does not ("enable" / "turn on").
* **entities**: acronyms and capitalised words inside a sentence; each must occur (case and
  accent folded) among the other query's words.
* **negated**: whether any negation ("not", "n't", "never", "não", "sem", "nunca", "sin",
  "nicht", ...; word lists in fourteen languages, marks inside words in Chinese, Japanese and
  Korean) occurs, and how many (``negations``: each mark, and each sentence holding negation
  words, so that "ne ... pas", "no ... nunca" and "não ... nada" count once, as "pas" or
  "nunca" alone do); one query negated and the other not, or negated more often
  ("有什么不同, 可以...吗" / "...不可以...吗"), is a different question.

Markers ("Art.", "artigo", "article", "§", "seção", "nº") are canonicalised, so "Art. 72" and
"artigo 72" agree. The rules are deliberately conservative: when in doubt they extract more, which
costs a cache miss (one more LLM call), never a wrong answer.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

__all__ = ["Identity", "disagreement", "extract", "fold", "nfc", "words"]

_APOSTROPHES = "'\u2019\uff07"  # ', the typographic one and the full-width one
#: Letters that ``\w`` leaves out: the vowel signs and viramas of Indic scripts, Thai, Lao,
#: Myanmar and Khmer (combining marks, written inside a word), Hebrew and Arabic points, the kana
#: voicing marks. Without them "नहीं" was split into "नह" and a lone mark, and no word list matched.
_MARKS = (
    "\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0610-\u061a\u064b-\u065f\u0670"
    "\u0900-\u0963\u0966-\u0dff\u0e31\u0e34-\u0e3a\u0e47-\u0e4e\u0eb1\u0eb4-\u0ebc"
    "\u0ec8-\u0ecd\u102b-\u103e\u1056-\u1059\u105e-\u1060\u1062-\u1064\u1067-\u106d"
    "\u1071-\u1074\u1082-\u108d\u108f\u109a-\u109d\u17b4-\u17d3\u17dd\u3099\u309a"
)
_WORD = re.compile(rf"[\w§{_MARKS}]+(?:[{_APOSTROPHES}][\w{_MARKS}]+)*", re.UNICODE)
#: A digit group; a sign or a leading decimal point counts where it starts the token ("-10",
#: ".5"), not inside one ("10-20", "CVE-2021", "v.5").
_NUMBER = re.compile(r"(?:(?<![\w.,])[-\u2212]?[.,]?(?=\d))?\d+(?:[.,]\d+)*")
_THOUSANDS = re.compile(r"\d{1,3}(?:([.,])\d{3})+")
_ORDINAL_OR_UNIT = re.compile(
    r"\d+(?:st|nd|rd|th|o|a|s|h|m|min|km|kg|g|mb|gb|tb|ms|x|k)?", re.IGNORECASE
)
_ROMAN = re.compile(r"M{0,3}(?:CM|CD|D?C{0,3})(?:XC|XL|L?X{0,3})(?:IX|IV|V?I{0,3})")
#: A word after one of these (and spaces) starts a sentence: its capital is not a name.
_SENTENCE_END = frozenset('.!?:;¿¡"“”(')

#: Markers of a structural unit, canonicalised (folded form -> canonical word).
MARKERS: dict[str, str] = {
    **dict.fromkeys(["art", "arts", "artigo", "artigos", "article", "articles", "articulo"], "art"),
    **dict.fromkeys(["§", "paragrafo", "paragrafos", "paragraph", "par"], "par"),
    **dict.fromkeys(["section", "sections", "sec", "secao", "secoes", "seccion"], "sec"),
    **dict.fromkeys(["inciso", "incisos", "item", "itens", "items", "clause", "clausula"], "item"),
    **dict.fromkeys(["chapter", "capitulo", "cap", "titulo", "title", "part", "parte"], "chap"),
    **dict.fromkeys(["alinea", "alineas", "letter", "letra", "annex", "anexo"], "annex"),
    **dict.fromkeys(["appendix"], "annex"),
    **dict.fromkeys(["apendice", "volume", "vol", "book", "livro", "lei", "law", "act"], "unit"),
    **dict.fromkeys(["no", "nº", "n", "num", "number", "numero"], "num"),
}
_NUMBER_WORDS: dict[str, str] = {
    **{
        w: str(i)
        for i, w in enumerate(
            ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"], 2
        )
    },
    **{
        w: str(i) for i, w in enumerate(["eleven", "twelve", "thirteen", "fourteen", "fifteen"], 11)
    },
    **{"one": "1", "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50"},
    **{"hundred": "100", "thousand": "1000", "million": "1000000", "billion": "1000000000"},
    **{"dois": "2", "duas": "2", "tres": "3", "quatro": "4", "cinco": "5", "seis": "6"},
    **{"sete": "7", "oito": "8", "nove": "9", "dez": "10", "onze": "11", "doze": "12"},
    **{"quinze": "15", "vinte": "20", "trinta": "30", "cem": "100", "mil": "1000"},
}
_ORDINALS_EN = "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth"
_ORDINALS_PT = "primeiro segundo terceiro quarto quinto sexto setimo oitavo nono decimo"
_ORDINALS_PT_F = "primeira segunda terceira quarta quinta sexta setima oitava nona decima"
#: Ordinal words, as the number they rank ("first" = "1st" = 1; "segunda" = 2).
_ORDINAL_WORDS: dict[str, str] = {
    **{
        w: str(i)
        for ordinals in (_ORDINALS_EN, _ORDINALS_PT, _ORDINALS_PT_F)
        for i, w in enumerate(ordinals.split(), 1)
    },
    **{"twentieth": "20", "hundredth": "100"},
}
#: Words whose opposite asks the opposite question ("minimum" / "maximum" wage, "before" /
#: "after" surgery), as ``group:side``: two queries that name opposite sides of one group
#: disagree. One naming a side and the other none is not a disagreement ("enable" / "turn on"
#: is a paraphrase). Folded forms; English and Portuguese.
_CONTRASTS: dict[str, str] = {
    word: f"{group}:{side}"
    for group, sides in {
        "when": (["before", "antes"], ["after", "depois", "apos"]),
        "extreme": (["minimum", "min", "minimo", "minima", "lowest"],
                    ["maximum", "max", "maximo", "maxima", "highest"]),
        "change": (["increase", "raise", "aumentar", "aumento", "subir"],
                   ["decrease", "reduce", "lower", "diminuir", "reduzir", "baixar"]),
        "rank": (["last", "ultimo", "ultima", "final"], ["penultimate", "penultimo"]),
        "quality": (["best", "melhor", "melhores"], ["worst", "pior", "piores"]),
        "speed": (["fastest", "faster", "quickest"], ["slowest", "slower"]),
        "size": (["largest", "biggest", "larger", "bigger", "maior", "maiores"],
                 ["smallest", "smaller", "menor", "menores"]),
        "trade": (["buy", "buying", "comprar"], ["sell", "selling", "vender"]),
        "flow": (["import", "imports", "importar"], ["export", "exports", "exportar"]),
        "switch": (["enable", "activate", "ativar", "habilitar"],
                   ["disable", "deactivate", "desativar", "desabilitar"]),
        "range": (["above", "over", "acima"], ["below", "under", "abaixo"]),
    }.items()
    for side, words_ in enumerate(sides)
    for word in words_
}  # fmt: skip
#: Words that give two names a direction ("Celsius to Fahrenheit", "Python faster than Java"):
#: two entities with one of these between them are an ordered pair, an identity code.
_DIRECTIONAL = {"to", "into", "than", "vs", "versus", "from", "para", "que", "em", "over"}
_MONTHS_EN = "january february march april may june july august september october november december"
_MONTHS_PT = (
    "janeiro fevereiro marco abril maio junho julho agosto setembro outubro novembro dezembro"
)
_MONTHS: dict[str, str] = {
    m: str(i) for months in (_MONTHS_EN, _MONTHS_PT) for i, m in enumerate(months.split(), 1)
}
#: English month names that are also common words: months only next to a number or after these.
_AMBIGUOUS_MONTHS = {"may", "march", "august"}
_MONTH_CONTEXT = {"in", "em", "de", "of", "during", "durante", "until", "ate", "since", "desde"}
_RELATIVE_DAYS = {
    "today", "tomorrow", "yesterday", "tonight", "hoje", "amanha", "ontem", "anteontem",
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
}  # fmt: skip
_NEGATIONS = {
    "not", "never", "none", "nobody", "nothing", "nowhere", "neither", "nor", "without",
    "cannot", "dont", "doesnt", "didnt", "cant", "wont", "isnt", "arent", "wasnt", "shouldnt",
    "nao", "nem", "nunca", "jamais", "sem", "nenhum", "nenhuma", "nada", "ninguem",
    "sin", "jamas", "ningun", "ninguna", "nadie", "tampoco",
    "ne", "pas", "sans", "aucun", "aucune",
    "nicht", "kein", "keine", "keinen", "nie", "niemals", "ohne",
}  # fmt: skip
#: The same in Italian, Dutch, Russian, Greek, Hindi, Arabic, Hebrew and Korean, as written
#: (folded into :data:`_NEGATIONS` below: folding strips Greek accents and splits Hangul).
#: Not Greek ποτέ ("never"): it folds to πότε ("when?"); "never" comes with δεν or μην.
_OTHER_NEGATIONS = (
    "non", "senza", "nessuno", "nessuna", "niente", "nulla",
    "niet", "geen", "nooit", "zonder", "niets", "niemand",
    "не", "нет", "нельзя", "никогда", "ни", "без", "ничего", "никто",
    "δεν", "μην", "όχι", "χωρίς", "κανένας", "τίποτα",
    "नहीं", "न", "मत", "बिना",
    "لا", "ليس", "ليست", "لم", "لن", "بدون",
    "לא", "אין", "בלי",
    "안",
)  # fmt: skip
#: Negation inside a word, where a language does not set it apart: Chinese 不 / 没 (沒),
#: Japanese ない / なかった / なく(て) / ません, Korean 않 / 못 / 없. Matched in the text
#: itself, each occurrence counted (:attr:`Identity.negations`): a mark inside an ordinary word
#: costs a cache miss, and never hides a second, real negation. So a word is left out only where
#: no negation can begin or end the same way: 不但 / 不仅 "not only", 不论 "whatever"; 沉没 /
#: 淹没 / 埋没 "sink, flood, bury"; すみません "excuse me"; 少ない / 危ない "few, dangerous" (and
#: their other forms); 잘못 "wrong". Not 不同 "different" (不同意 "disagree", 不同步 "out of
#: sync"), 不过 "but" (不过敏 "not allergic"), 没收 "confiscate" (没收到 "not received"), 不少
#: "many" (不少于 "no fewer than"): those count, a miss at worst. Not 未 or 别 at all (未来
#: "future", 特别 "especially").
_NEGATION_MARKS = re.compile(
    "不(?![但仅僅论論])|(?<![沉淹埋])[没沒]"
    "|(?<!すみ)ません|(?<![少危])な(?:い|かった|く)"
    "|않|(?<!잘)못|없"
)
#: Characters that end a sentence: negation words count once per sentence that holds them
#: (:func:`extract`).
_SENTENCE_STOPS = frozenset(".?!;\n\u2026\u3002\uff1f\uff01\uff1b")
#: Words that show a Portuguese query, where "no" means "in the", not "no". Not "do" ("of the"):
#: English questions start with it ("Do children with no fever need ...?" is negated).
_PORTUGUESE = {"o", "os", "dos", "da", "das", "na", "nas", "nos", "ao", "aos", "em",
               "uma", "voce", "nao", "sao", "pelo", "pela", "qual", "quais"}  # fmt: skip


def fold(text: str) -> str:
    """Casefolded, accents stripped ("Não" -> "nao", "Código" -> "codigo")."""
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


_NEGATIONS |= {fold(word) for word in _OTHER_NEGATIONS}


def nfc(text: str) -> str:
    """``text`` in Unicode NFC: "Não" typed on one keyboard (one code point for "ã") and pasted
    from a PDF or a macOS file name (NFD: "a" + a combining tilde) is one question."""
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def _fold_word(token: str) -> str:
    token = fold(token).replace("\u2019", "'").replace("\uff07", "'")
    return token[:-2] if token.endswith("'s") else token


def words(text: str) -> list[str]:
    """Folded word tokens, possessive "'s" dropped ("France's" -> "france").

    Why split first and fold each word after: folding can change where words end ("½" folds
    to "1", a fraction slash and "2"; one Arabic ligature to four words), and :func:`extract`
    pairs each word with the raw token it came from: both must come from one split."""
    folded = (_fold_word(token) for token in _WORD.findall(nfc(text)))
    return [word for word in folded if word]  # a word of combining marks alone folds to ""


def normalize_number(raw: str) -> str:
    """ "1.000"/"1,000" -> "1000", "3,5" -> "3.5", "05" -> "5", "1.000,50" -> "1000.50"; version
    strings ("3.11.2", "3.10") stay as written, so "3.10" and "3.1" differ. A sign stays
    ("-10" is not "10"), and a leading point is a zero (".5" = "0.5", not "5")."""
    if raw[:1] in "-\u2212":
        return "-" + normalize_number(raw[1:])
    if raw[:1] in ".,":
        raw = "0" + raw
    if "." in raw and "," in raw:
        decimal = "." if raw.rfind(".") > raw.rfind(",") else ","
        whole, _, frac = raw.rpartition(decimal)
        return f"{int(re.sub(r'[.,]', '', whole))}.{frac}"
    if _THOUSANDS.fullmatch(raw):
        return str(int(re.sub(r"[.,]", "", raw)))
    if "." in raw or "," in raw:
        head, _, rest = raw.replace(",", ".").partition(".")
        return f"{int(head)}.{rest}"
    return str(int(raw))


@dataclass(frozen=True)
class Identity:
    """What a query is about, beyond its topic (see the module docstring)."""

    numbers: tuple[str, ...]
    codes: tuple[str, ...]
    entities: frozenset[str]
    negated: bool
    words: frozenset[str]
    #: ``group:side`` of each contrast word ("extreme:0" for "minimum"); see ``_CONTRASTS``.
    contrasts: frozenset[str] = frozenset()
    #: How many negations: each negation mark, and each sentence holding negation words (a
    #: language's double negation, "ne ... pas", is one). ``negated`` is ``negations > 0``.
    #: Compared as a count: "有什么不同, 可以...吗" and "有什么不同, 不可以...吗" are both negated.
    negations: int = 0


def _code(token: str) -> str | None:
    """The canonical code of a raw whitespace token mixing letters and digits, else None."""
    core = token.strip(".,;:!?()[]{}\"'\u201c\u201d\u2018\u2019")
    folded = fold(core)
    if not (re.search(r"\d", folded) and re.search(r"[^\W\d_]", folded)):
        return None
    bare = re.sub(r"^(?:v|art|arts|n|no|nº)\.?", "", folded)  # "v2.3", "Art.72", "nº5"
    if _NUMBER.fullmatch(bare) or _ORDINAL_OR_UNIT.fullmatch(bare.replace("º", "").strip("ª")):
        return None
    return re.sub(r"[\W_]", "", bare) or None


def extract(text: str) -> Identity:
    """The :class:`Identity` of one query (of its NFC form: NFC and NFD text agree)."""
    text = nfc(text)
    # (position, value): numbers are compared in text order, so "05/06" is not "06/05" and
    # "7 minus 3" not "3 minus 7" (as a multiset they were one question).
    numbers: list[tuple[int, str]] = [
        (m.start(), normalize_number(m.group())) for m in _NUMBER.finditer(text)
    ]
    codes = [c for c in map(_code, text.split()) if c]
    raw = list(_WORD.finditer(text))
    folded = [_fold_word(match.group()) for match in raw]  # one per raw token, always
    portuguese = bool(_PORTUGUESE & set(folded))
    entities: set[str] = set()
    named: list[tuple[int, str]] = []  # (word index, folded) of each entity, in order
    contrasts: set[str] = set()
    negations = 0 if text.isascii() else len(_NEGATION_MARKS.findall(text))  # + sentences below
    negated_sentences: set[int] = set()
    sentence = 0
    mostly_upper = sum(t.group().isupper() for t in raw) > len(raw) / 2
    for i, (match, word) in enumerate(zip(raw, folded, strict=True)):
        token = match.group()
        prev = folded[i - 1] if i else ""
        nxt = folded[i + 1] if i + 1 < len(folded) else ""
        if i and not _SENTENCE_STOPS.isdisjoint(text[raw[i - 1].end() : match.start()]):
            sentence += 1
        if word in _NEGATIONS or word.endswith("n't") or (word == "no" and not portuguese):
            negated_sentences.add(sentence)
        if word in _NUMBER_WORDS:
            numbers.append((match.start(), _NUMBER_WORDS[word]))
            continue
        if word in _ORDINAL_WORDS:
            numbers.append((match.start(), _ORDINAL_WORDS[word]))
            continue
        if word in _CONTRASTS:
            contrasts.add(_CONTRASTS[word])
        if word in _MONTHS and (
            word not in _AMBIGUOUS_MONTHS
            or prev in _MONTH_CONTEXT
            or any(c.isdigit() for c in prev + nxt)
        ):
            numbers.append((match.start(), _MONTHS[word]))
            continue
        if word in _RELATIVE_DAYS:
            codes.append(word)
            continue
        if MARKERS.get(prev) in {"item", "chap", "par", "sec", "art", "annex"}:
            if token.isupper() and _ROMAN.fullmatch(token):
                numbers.append((match.start(), str(_roman(token))))
                continue
            if len(token) == 1 and token.isalpha():
                codes.append(f"letter:{word}")
                continue
        if word in MARKERS or word in _NEGATIONS or not token[:1].isalpha():
            continue
        # What precedes the word, back to the last word (a word's own last character never
        # ends a sentence): only this gap, so a 100k-word prompt costs linear time, not
        # quadratic (searching the whole prefix took 12 s per put of a 30k-word RAG prompt).
        gap = text[raw[i - 1].end() : match.start()].rstrip() if i else ""
        at_start = i == 0 or gap[-1:] in _SENTENCE_END
        if len(token) < 2 or mostly_upper:
            continue
        if token.isupper() or (token[:1].isupper() and not at_start):
            entities.add(word)
            if named and any(w in _DIRECTIONAL for w in folded[named[-1][0] + 1 : i]):
                codes.append(f"order:{named[-1][1]}>{word}")
            named.append((i, word))
    negations += len(negated_sentences)
    numbers.extend(_number_symbols(text))
    codes.extend(_other_symbols(text))
    return Identity(
        numbers=tuple(value for _, value in sorted(numbers)),
        codes=tuple(sorted(codes)),
        entities=frozenset(entities),
        negated=negations > 0,
        words=frozenset(word for word in folded if word),  # a word of marks alone folds to ""
        contrasts=frozenset(contrasts),
        negations=negations,
    )


def _number_symbols(text: str) -> list[tuple[int, str]]:
    r"""Numbers written as one symbol ``\d`` does not match: vulgar fractions ("½", "¼"),
    superscripts and circled digits ("²", "①"), as their value ("0.5", "2"). "½ cup" and
    "¼ cup" are different questions."""
    if text.isascii():
        return []
    found = []
    for i, char in enumerate(text):
        if unicodedata.category(char) in ("No", "Nl"):  # "Nl": letter-like, "Ⅻ" (12)
            value = unicodedata.numeric(char, None)
            if value is not None:
                found.append((i, f"{value:g}"))
    return found


def _other_symbols(text: str) -> list[str]:
    """Symbols (Unicode category "So": emoji, flags as regional-indicator pairs, "©", "°"), each
    as a code. An embedder reads most of them as one unknown token and the lexical score drops
    them, so "How much does 🍕 cost?" and "... 🍔 ..." were one question at score 1.0."""
    if text.isascii():
        return []
    return [f"symbol:{char}" for char in text if unicodedata.category(char) == "So"]


def _roman(token: str) -> int:
    values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
    total = 0
    for i, ch in enumerate(token):
        value = values[ch]
        total += -value if i + 1 < len(token) and values[token[i + 1]] > value else value
    return total


def _opposed(a: frozenset[str], b: frozenset[str]) -> bool:
    """Whether ``a`` and ``b`` name different sides of one contrast group (both name it)."""
    if not (a and b) or a == b:
        return False
    sides_a, sides_b = _sides(a), _sides(b)
    return any(sides_a[g] != sides_b[g] for g in sides_a.keys() & sides_b.keys())


def _sides(contrasts: frozenset[str]) -> dict[str, set[str]]:
    """``{"extreme:0", "when:1"}`` -> ``{"extreme": {"0"}, "when": {"1"}}``."""
    sides: dict[str, set[str]] = {}
    for item in contrasts:
        group, _, side = item.partition(":")
        sides.setdefault(group, set()).add(side)
    return sides


def disagreement(a: Identity, b: Identity) -> str | None:
    """Why ``a`` and ``b`` ask about different things ("numbers", "codes", "negation",
    "contrast", "entities"), or None when their identity tokens agree."""
    if a.numbers != b.numbers:
        return "numbers"
    if a.codes != b.codes:
        return "codes"
    if a.negated != b.negated or a.negations != b.negations:
        return "negation"
    if _opposed(a.contrasts, b.contrasts):
        return "contrast"
    if not (a.entities <= b.words and b.entities <= a.words):
        return "entities"
    return None
