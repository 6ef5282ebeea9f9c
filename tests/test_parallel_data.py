"""Parallel text and gold alignments (attnaudit/data/parallel.py): hand-made files, round trips, every bad input,
and the Hansards gold in ../shared/data."""
from __future__ import annotations

import re

import pytest

from attnaudit.analyses.alignment import aer, corpus_aer
from attnaudit.data.examples import Example
from attnaudit.data.parallel import (
    GoldAlignment,
    ParallelFormatError,
    format_links,
    read_alignments,
    read_parallel,
    write_parallel,
)

TEXT = "the red cat ||| le chat rouge\nit sleeps   ||| il dort  \n"
GOLD = "1-1 2-3 3p2 3-2\n2-2 1p1\n"


def _files(tmp_path, text=TEXT, gold=GOLD):
    t, g = tmp_path / "pairs.src-tgt", tmp_path / "pairs.gold"
    t.write_text(text, encoding="utf-8")
    g.write_text(gold, encoding="utf-8")
    return t, g


def test_reads_pairs_and_gold_zero_based_with_sure_and_possible_apart(tmp_path):
    t, g = _files(tmp_path)
    ex = read_parallel(t, alignments=g)
    assert [(e.id, e.text, e.target) for e in ex] == [("0", "the red cat", "le chat rouge"), ("1", "it sleeps", "il dort")]
    # 1-indexed i-j -> 0-based (source, target); Example.alignment holds the Sure links only, sorted
    assert ex[0].alignment == ((0, 0), (1, 2), (2, 1)) and ex[1].alignment == ((1, 1),)
    gold = read_alignments(g, ex)
    assert gold[0] == GoldAlignment(sure={(0, 0), (1, 2), (2, 1)}, possible={(2, 1)})
    assert gold[0].possible == {(0, 0), (1, 2), (2, 1)}                   # 3p2 and 3-2: one link, Sure
    assert gold[1].sure == {(1, 1)} and gold[1].possible == {(0, 0), (1, 1)}
    assert read_parallel(t)[0].alignment is None


def test_crlf_blank_gold_lines_and_no_final_newline(tmp_path):
    t, g = _files(tmp_path, "a b ||| x\r\nc ||| y z", "\n1-2 1p1\n")
    ex = read_parallel(t, alignments=g)
    assert [e.target for e in ex] == ["x", "y z"] and ex[0].alignment == ()
    assert read_alignments(g, ex)[1] == GoldAlignment(sure={(0, 1)}, possible={(0, 0)})


def test_round_trip_write_then_read(tmp_path):
    examples = [Example("a", "the red cat", target="le chat rouge", alignment=((0, 0), (1, 2), (2, 1))),
                Example("b", "it sleeps", target="il dort", alignment=((0, 0), (1, 1)))]
    gold = [GoldAlignment({(0, 0), (2, 1)}, {(1, 2)}), GoldAlignment({(1, 1)}, {(0, 0)})]
    t, g = tmp_path / "out" / "p.txt", tmp_path / "out" / "p.gold"
    write_parallel(examples, t, alignments=g, gold=gold)
    assert g.read_text() == "1-1 3-2 2p3\n2-2 1p1\n"
    back = read_parallel(t, alignments=g)
    assert [(e.text, e.target) for e in back] == [(e.text, e.target) for e in examples]
    assert read_alignments(g, back) == gold
    write_parallel(examples, t, alignments=g)                              # no gold: the alignments, all Sure
    assert [e.alignment for e in read_parallel(t, alignments=g)] == [e.alignment for e in examples]
    assert read_alignments(g, back) == [GoldAlignment.from_example(e) for e in examples]
    # the file as read -> written -> read is unchanged (spaces normalised on the first read)
    t2, g2 = _files(tmp_path)
    ex = read_parallel(t2, alignments=g2)
    write_parallel(ex, tmp_path / "again.txt", alignments=tmp_path / "again.gold", gold=read_alignments(g2, ex))
    assert read_parallel(tmp_path / "again.txt", alignments=tmp_path / "again.gold") == ex
    assert format_links(GoldAlignment(sure={(0, 0)}, possible={(1, 1)})) == "1-1 2p2"


def _raises(path, line, rule, call):
    with pytest.raises(ParallelFormatError, match=rf"^{re.escape(str(path))}, line {line}: .*{rule}") as info:
        call()
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("text, line, rule", [
    ("a ||| x\nb x\n", 2, r"has no '\|\|\|' separator; each line must be 'source words \|\|\| target words'"),
    ("a ||| x ||| y\n", 1, r"has 2 '\|\|\|' separator"),
    ("a ||| x\n\n", 2, "has no"),                                               # a blank line is no pair
    ("a ||| x\n   ||| y\n", 2, "the source \\(left of '\\|\\|\\|'\\) side is empty"),
    ("a ||| x\nb |||  \n", 2, "the target \\(right of '\\|\\|\\|'\\) side is empty"),
    ("", 1, "holds no sentence pairs"),
])
def test_bad_text_lines_name_file_line_and_rule(tmp_path, text, line, rule):
    t, _ = _files(tmp_path, text=text)
    _raises(t, line, rule, lambda: read_parallel(t))


@pytest.mark.parametrize("gold, line, rule", [
    ("1-1\n0-1\n", 2, r"link '0-1' has source index 0 out of range \[1, 2\]"),
    ("1-1\n3-1\n", 2, r"link '3-1' has source index 3 out of range \[1, 2\] \(the source side has 2 words"),
    ("1-4\n1-1\n", 1, r"link '1-4' has target index 4 out of range \[1, 3\]"),
    ("1p0\n1-1\n", 1, r"target index 0 out of range"),
    ("1-1 1:2\n1-1\n", 1, r"malformed link '1:2'; links are 1-indexed 'i-j' \(Sure\) or 'ipj' \(Possible\)"),
    ("1-1\n1-\n", 2, "malformed link '1-'"),
    ("1-1\na-b\n", 2, "malformed link 'a-b'"),
    ("1-1\n-1-1\n", 2, "malformed link '-1-1'"),
    ("1-1\n", 2, r"the gold file has 1 lines but the text file \(.*pairs.src-tgt\) has 2 sentence pairs"),
    ("1-1\n1-1\n1-1\n", 3, "the gold file has 3 lines but the text file"),
])
def test_bad_gold_lines_name_file_line_and_rule(tmp_path, gold, line, rule):
    t, g = _files(tmp_path, gold=gold)
    _raises(g, line, rule, lambda: read_parallel(t, alignments=g))


def test_missing_files_and_unwritable_examples(tmp_path):
    with pytest.raises(ParallelFormatError, match="does not exist or is not a file"):
        read_parallel(tmp_path / "nope.txt")
    with pytest.raises(ParallelFormatError, match="is a folder"):
        read_parallel(tmp_path)
    with pytest.raises(ValueError, match=r"examples\[0\] \('x'\) must have words in both text and target"):
        write_parallel([Example("x", "a b")], tmp_path / "w.txt")
    with pytest.raises(ValueError, match=r"holds '\|\|\|' in its text or target"):
        write_parallel([Example("x", "a ||| b", target="c")], tmp_path / "w.txt")


def test_hansards_gold(shared_data):
    folder = shared_data / "hansards_enfr_align"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent; this test reads the WPT 2003 Hansards alignment gold beside the repo.")
    ex = read_parallel(folder / "enfr.src-tgt", alignments=folder / "enfr.gold")
    gold = read_alignments(folder / "enfr.gold", ex)
    # counts measured in ../shared/data/hansards_enfr_align/SOURCE.md
    assert len(ex) == len(gold) == 447
    assert sum(len(e.text.split()) for e in ex) == 7020 and sum(len(e.target.split()) for e in ex) == 7761
    assert sum(len(g.sure) for g in gold) == 4038 and sum(len(g.possible - g.sure) for g in gold) == 13400
    assert all(g.sure <= g.possible and set(e.alignment) == g.sure for e, g in zip(ex, gold))
    # line 10 holds "1-1 1-2 2-3": both -> tous, both -> deux, have -> possèdent
    e9 = ex[9]
    assert e9.text.split()[:2] == ["both", "have"] and e9.target.split()[:3] == ["tous", "deux", "possèdent"]
    assert {(0, 0), (0, 1), (1, 2)} <= gold[9].sure
    # the gold itself scores AER 0; a monotone diagonal baseline scores worse with Possible links than without
    assert corpus_aer([g.sure for g in gold], [g.sure for g in gold], [g.possible for g in gold]) == 0.0
    diagonal = [{(i, i) for i in range(min(len(e.text.split()), len(e.target.split())))} for e in ex]
    with_p = corpus_aer(diagonal, [g.sure for g in gold], [g.possible for g in gold])
    assert 0 < with_p < corpus_aer(diagonal, [g.sure for g in gold]) < 1
    assert aer(diagonal[9], gold[9].sure, gold[9].possible) < 1
