"""The BM25 encoder, used from several ingestion threads at once."""

from concurrent.futures import ThreadPoolExecutor

from services.knowledge.lexical import LexicalEncoder


def test_concurrent_encoding_matches_sequential() -> None:
    texts = [
        f"Generalizations {i}: the relational organizations were rationalizing conditionally "
        f"hopefully {i} running runners ran operationally"
        for i in range(400)
    ]
    expected = [LexicalEncoder().encode_passage(t) for t in texts]
    shared = LexicalEncoder()
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(shared.encode_passage, texts)) == expected


def test_terms_are_stemmed_without_stop_words() -> None:
    encoder = LexicalEncoder()
    assert encoder.terms("The runners were running to the organizations") == [
        "runner",
        "run",
        "organiz",
    ]
    query = encoder.encode_query("running runs")
    assert len(query.indices) == 1 and query.values == [1.0]
