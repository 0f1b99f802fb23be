# ruff: noqa: RUF001
"""The semantic cache's guards on text outside English and Portuguese.

What the guide promises there (docs/guides/semantic-cache.md, "Other languages"): the long-query
rule counts characters of scripts written without spaces, and negations are caught in the
languages it lists; names in scripts without case are left to the scores (documented, and
pinned below so the docs stay true).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_rerank_plugins import ModelPool, ModelSpec
from rag_rerank_plugins.semantic_cache import SemanticCache
from rag_rerank_plugins.semantic_cache.guards import MAX_SEMANTIC_WORDS, too_long
from rag_rerank_plugins.semantic_cache.identity import disagreement, extract, words
from rag_rerank_plugins.semantic_cache.lexical import tokens

ZH_CONTEXT = (
    "植物通过叶绿体吸收阳光并把二氧化碳和水转化为葡萄糖和氧气这一过程对地球生命至关重要，" * 30
)


@pytest.fixture(scope="module")
def cache(minilm_path: str) -> Iterator[SemanticCache]:
    pool = ModelPool()
    yield SemanticCache(ModelSpec(minilm_path, backend="sentence-transformers"), pool=pool)
    pool.clear()


def test_spaceless_scripts_count_one_token_per_character() -> None:
    assert tokens("北京的人口") == ["北", "京", "的", "人", "口"]
    assert tokens("2023年GPT4模型") == ["2023", "年", "gpt4", "模", "型"]
    assert tokens("東京タワー") == ["東", "京", "タ", "ワ", "ー"]
    assert len(tokens("서울의 인구")) == 2  # Korean sets words apart: words
    assert tokens("Quantos habitantes tem o Brasil?") == [
        "quantos", "habitantes", "tem", "o", "brasil",
    ]  # fmt: skip
    prompt = "以下是检索到的资料：" + ZH_CONTEXT + "问题：光合作用需要什么条件？"
    assert too_long(tokens(prompt))  # it was 33 "words": one per clause
    assert not too_long(tokens("光合作用需要什么条件？"))
    assert len(tokens(ZH_CONTEXT)) > MAX_SEMANTIC_WORDS


def test_words_keep_their_combining_letters() -> None:
    """Vowel signs and viramas are letters of the word they are written in: split there, Hindi
    "नहीं" ("not") became "नह" and no word list could match it."""
    assert len(words("क्या यह दवा सुरक्षित नहीं है?")) == 6
    assert len(words("มีประชากรเท่าไหร่ ในกรุงเทพ")) == 2
    assert words("दवा। नहीं") == words("दवा नहीं")  # the danda ends a sentence, not a word part


def test_a_long_chinese_prompt_only_hits_on_identical_text(cache: SemanticCache) -> None:
    """A RAG prompt: the same retrieved context, two different questions. Counted by clauses it
    was a short query and hit (dense 1.0, fused 0.99): the answer about photosynthesis came
    back for a question about roots."""
    ask = "以下是检索到的资料：" + ZH_CONTEXT + "问题：{}"
    cache.put(ask.format("光合作用需要什么条件？"), "A", namespace="zh-long")
    assert cache.lookup(ask.format("植物的根有什么作用？"), namespace="zh-long") is None
    [verdict] = cache.explain(ask.format("植物的根有什么作用？"), namespace="zh-long")
    assert verdict.reason == "length"
    same = cache.lookup(ask.format("光合作用需要什么条件？"), namespace="zh-long")
    assert same is not None
    assert same.value == "A"


NEGATED = [
    ("Нужно ли пить антибиотики при простуде?", "Не нужно ли пить антибиотики при простуде?"),
    ("Можно ли пить кофе при давлении?", "Нельзя ли пить кофе при давлении?"),
    ("감기에 항생제를 먹어야 합니까?", "감기에 항생제를 먹지 않아야 합니까?"),
    ("感冒需要吃抗生素吗？", "感冒不需要吃抗生素吗？"),
    ("風邪に抗生物質を飲みますか？", "風邪に抗生物質を飲みませんか？"),
    ("Il farmaco è sicuro in gravidanza?", "Il farmaco non è sicuro in gravidanza?"),
    ("Is het medicijn veilig?", "Is het medicijn niet veilig?"),
    ("Είναι ασφαλές το φάρμακο;", "Δεν είναι ασφαλές το φάρμακο;"),
    ("क्या यह दवा सुरक्षित है?", "क्या यह दवा सुरक्षित नहीं है?"),
    ("هل الدواء آمن للأطفال؟", "هل الدواء ليس آمنا للأطفال؟"),
    ("האם התרופה בטוחה?", "האם התרופה לא בטוחה?"),
    # Negations that begin like an excluded word: 不同意 "disagree", 没收到 "did not receive",
    # 不少于 "no fewer than"; and Japanese plain and polite adjective negatives.
    ("你同意这个观点吗？", "你不同意这个观点吗？"),
    ("我收到包裹了吗？", "我没收到包裹吗？"),
    ("少于十人可以报名吗？", "不少于十人可以报名吗？"),
    ("この薬は高いですか？", "この薬は高くないですか？"),
    ("この薬を飲む人は？", "この薬を飲まない人は？"),
    ("この薬は飲んでもいいですか？", "この薬は飲まなくてもいいですか？"),
    ("Was tun, wenn ich eine Antwort bekomme?", "Was tun, wenn ich nie eine Antwort bekomme?"),
    # ... and those that begin like a word that does not negate: 不过敏 "not allergic" (不过
    # "but"), 没收据 "no receipt" (没收 "confiscate"), 不同步 "out of sync" (不同 "different").
    ("我对花生过敏，可以吃这个蛋糕吗？", "我对花生不过敏，可以吃这个蛋糕吗？"),
    ("我有收据可以退货吗？", "我没收据可以退货吗？"),
    ("手机和电脑同步吗？", "手机和电脑不同步吗？"),
]  # fmt: skip


@pytest.mark.parametrize(("plain", "negated"), NEGATED)
def test_negations_in_the_listed_languages_are_told_apart(plain: str, negated: str) -> None:
    assert extract(plain).negated is False
    assert extract(negated).negated is True


@pytest.mark.parametrize(
    "text",
    [
        "未来的天气怎么样？", "特别推荐哪本书？", "少ない予算で旅行するには？", "Qual é o risco?",
        "泰坦尼克号是哪一年沉没的？", "不但便宜而且好用吗？",
        "비밀번호를 잘못 입력하면 계정이 잠기나요?", "この薬は副作用が少ないですか？",
        "昨年の売上は少なかったですか？", "すみません、東京駅はどこですか？",
        "Πότε πρέπει να παίρνω ασπιρίνη;", "ΠΟΤΕ ΠΡΕΠΕΙ ΝΑ ΠΑΙΡΝΩ ΑΣΠΙΡΙΝΗ;",
    ],
)  # fmt: skip
def test_words_that_only_look_negative_are_not_negations(text: str) -> None:
    """沉没 "sink", 잘못 "wrong", すみません "excuse me", 少ない "few", πότε "when?" (ποτέ "never"
    folds to it): flagged as negated, such a question hid a real negation added to it (the flag
    was already set), and got the plain question's answer."""
    assert extract(text).negated is False


#: A plain question holding a word that looks negative, and the same question negated.
NEGATED_AGAIN = [
    ("这两个版本有什么不同？可以直接升级吗？", "这两个版本有什么不同？不可以直接升级吗？"),
    ("잘못된 약을 먹었을 때 물을 마셔야 합니까?",
     "잘못된 약을 먹었을 때 물을 마시지 않아야 합니까?"),
    ("副作用が少ないですが、妊娠中に飲めますか？", "副作用が少ないですが、妊娠中に飲めませんか？"),
    ("Πότε πρέπει να παίρνω ασπιρίνη;", "Πότε δεν πρέπει να παίρνω ασπιρίνη;"),
    ("这个药能吃吗？没问题吗？", "这个药不能吃吗？没问题吗？"),  # 没 counted on both sides
    ("Is it not safe? Can I drive?", "Is it not safe? Can I not drive?"),
]  # fmt: skip


@pytest.mark.parametrize(("plain", "negated"), NEGATED_AGAIN)
def test_negations_are_counted_so_a_second_one_is_seen(plain: str, negated: str) -> None:
    assert extract(negated).negations == extract(plain).negations + 1
    assert disagreement(extract(plain), extract(negated)) == "negation"
    assert disagreement(extract(plain), extract(plain)) is None


@pytest.mark.parametrize(("plain", "negated"), NEGATED[:4] + NEGATED_AGAIN[:4])
def test_a_negated_question_does_not_get_the_plain_ones_answer(
    cache: SemanticCache, plain: str, negated: str
) -> None:
    """Through the cache, with the default embedder: a negation (or a second one, next to a
    word that only looks negative) misses; the plain question still hits."""
    namespace = f"neg-{abs(hash(plain))}"
    cache.put(plain, "ANSWER-TO-PLAIN", namespace=namespace)
    assert cache.lookup(negated, namespace=namespace) is None
    assert cache.lookup(plain, namespace=namespace) is not None


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("Que faire si je ne trouve pas le fichier ?", "Que faire si je trouve pas le fichier ?"),
        ("¿Por qué no llega nunca el código?", "¿Por qué nunca llega el código?"),
        ("Por que o app não mostra nada?", "Por que o app nunca mostra nada?"),
        ("Why does the code not arrive?", "Why doesn't the code ever arrive?"),
    ],
)
def test_negation_words_count_once_per_sentence(one: str, other: str) -> None:
    """Negative concord: "ne ... pas", "no ... nunca", "não ... nada" are one negation, as "pas"
    or "nunca" alone are; counted per word, these paraphrases missed."""
    assert extract(one).negations == extract(other).negations == 1


def test_non_prefixed_words_are_negations_in_english_too() -> None:
    """Italian "non" also catches English "non-toxic": the opposite of "toxic", which hit before.
    The price, documented: "non-profit" and "nonprofit" are two questions (a miss, not a
    wrong answer)."""
    assert disagreement(extract("Is the paint toxic?"), extract("Is the paint non-toxic?"))
    assert extract("What is a non-profit?").negated
    assert not extract("What is a nonprofit?").negated


def test_a_word_of_combining_marks_alone_is_no_token() -> None:
    """A lone Hebrew point between spaces is kept in the word pattern (marks belong to their
    word) and folds to nothing: it must not become an empty word for BM25 or the word count."""
    assert words("a \u05b0 b") == ["a", "b"]
    assert tokens("a \u05b0 b") == ["a", "b"]
    assert "" not in extract("a \u05b0 b").words


def test_names_in_scripts_without_case_are_left_to_the_scores(cache: SemanticCache) -> None:
    """The documented limit: a changed name in Korean passes the hybrid guard (names are found
    by capital letters). If this starts failing, the limit is gone: update the guide."""
    cache.put("서울의 인구는 얼마입니까?", "9.4M", namespace="ko")
    hit = cache.lookup("부산의 인구는 얼마입니까?", namespace="ko")
    assert hit is not None
    assert hit.value == "9.4M"


#: Text drawn from the scripts and marks the rules read: CJK, kana, Hangul, Greek, Cyrillic,
#: Devanagari with its vowel signs, Hebrew points, Latin, digits, spaces and punctuation.
SCRIPTS = st.text(
    st.sampled_from(
        list("不同没收沉잘못않없すみませんなかったないでπότεδνеДं्नहीमत\u05b0לא aA1-?,.？、")
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(SCRIPTS, SCRIPTS)
def test_negation_count_invariants(a: str, b: str) -> None:
    """Whatever the text: ``negated`` is ``negations > 0``; a question agrees with itself; no
    empty word; and a sentence with a negation added always changes the count."""
    ia = extract(a)
    assert ia.negated == (ia.negations > 0)
    assert disagreement(ia, extract(a)) is None
    assert "" not in ia.words
    assert "" not in words(a)
    joined = extract(f"{a}. Is it not so? {b}")  # a sentence of its own
    assert joined.negations == extract(f"{a}. {b}").negations + 1
