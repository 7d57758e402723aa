"""The TC-EN parallel set (bailong/eval/parallel_set.py): paragraph alignment by id, the training-overlap filter,
the shipped file's claims recomputed, and the parallel_bpc / translation evaluators on the mini base."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import sacrebleu
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.data.corpus import read_jsonl
from bailong.eval.bpc import bits_per_char
from bailong.eval.config import EvalConfig, ParallelConfig
from bailong.eval.evaluators import EvalContext, run_evaluators
from bailong.eval.parallel import first_line
from bailong.eval.parallel_set import (
    HELP_DIR,
    aligned_pairs,
    assign_split,
    drop_trained,
    help_pages,
    load_pairs,
    page_paragraphs,
)
from conftest import ROOT, compose_config

SHIPPED = ROOT / "data/parallel/libreoffice_help.jsonl.gz"
MINI = ROOT / "models" / "mini-base"

TC_PAGE = """<html><head><script>var x = "<p id='par_id9'>not text</p>";</script></head><body>
<h1 id="hd_id1"><a name="x"></a>關閉自動 URL 識別</h1>
<p id="par_id2">選取要搜尋的<span class="emph">樣式</span>，然後按一下 [搜尋]。</p>
<p id="par_id3">LibreOffice Calc</p>
<p id="par_id4">简体中文的段落不算翻译</p>
<p id="par_id5">重複的段落</p><p id="par_id5">另一個段落</p>
<p id="par_id6">選取要搜尋的樣式，然後按一下 [搜尋]。</p>
<div id="other">不是段落</div>
</body></html>"""
EN_PAGE = """<html><body>
<h1 id="hd_id1">Turning off Automatic URL Recognition</h1>
<p id="par_id2">Select the   style to search for,<br/> then click Find.</p>
<p id="par_id3">LibreOffice Calc</p>
<p id="par_id4">A paragraph in Simplified Chinese is no translation</p>
<p id="par_id5">A repeated paragraph with two texts</p>
<p id="par_id6">Select the style to search for, then click Find.</p>
<div id="other">Not a paragraph</div>
</body></html>"""


def test_paragraphs_are_the_text_of_help_ids_with_their_markup_and_whitespace_folded():
    found = page_paragraphs(TC_PAGE)
    assert found["hd_id1"] == "關閉自動 URL 識別" and found["par_id2"] == "選取要搜尋的樣式，然後按一下 [搜尋]。"
    assert "par_id5" not in found  # one id, two texts: no alignment to trust
    assert "par_id9" not in found and "other" not in found  # script text, and ids that are no paragraph ids
    assert page_paragraphs(EN_PAGE)["par_id2"] == "Select the style to search for, then click Find."


def test_aligned_pairs_keep_translated_traditional_paragraphs_once():
    pairs = aligned_pairs({"text/a.html": TC_PAGE, "text/only_tc.html": TC_PAGE}, {"text/a.html": EN_PAGE})
    assert [(p["id"], p["tc"], p["en"]) for p in pairs] == [
        ("hd_id1", "關閉自動 URL 識別", "Turning off Automatic URL Recognition"),
        ("par_id2", "選取要搜尋的樣式，然後按一下 [搜尋]。", "Select the style to search for, then click Find."),
    ]  # par_id3 is untranslated, par_id4 Simplified, par_id6 repeats par_id2's text; only_tc has no English page
    assert {p["page"] for p in pairs} == {"text/a.html"}


def test_a_pair_sharing_a_span_with_training_text_is_dropped():
    pairs = [
        {"tc": "選取要搜尋的樣式，然後按一下搜尋或全部搜尋按鈕來尋找文字。", "en": "Select the style to search for."},
        {"tc": "防止修改選取儲存格的內容，直到取消保護工作表為止的設定。", "en": "Prevents the contents of cells."},
        {"tc": "範例傳回值。", "en": "The example returns choochoo."},
        {"tc": "短的段落。", "en": "An English side that was trained on, verbatim, in a longer text."},
    ]
    train_tc = ["前文……選取要搜尋的樣式，然後按一下搜尋或全部搜尋按鈕……後文", "標題\n範例傳回值。\n下一行"]
    train_en = ["Before. An English side that was trained on, verbatim, in a longer text. After."]
    kept, counts = drop_trained(pairs, train_tc, train_en, span=12)
    assert kept == [pairs[1]]
    assert counts == {"shared_with_tc_training": 2, "shared_with_en_training": 1}
    kept, _ = drop_trained(pairs, ["範例傳回值。還有別的"], [], span=12)  # a short side counts only as a whole line
    assert pairs[2] in kept


def test_help_pages_from_a_package_and_from_its_files(tmp_path):
    tree = tmp_path / "pkg" / HELP_DIR / "zh-TW" / "text" / "shared"
    tree.mkdir(parents=True)
    (tree / "a.html").write_text(TC_PAGE, encoding="utf-8")
    expected = {"text/shared/a.html": TC_PAGE}
    assert help_pages(tmp_path / "pkg", "zh-TW") == expected
    assert help_pages(tmp_path / "pkg" / HELP_DIR, "zh-TW") == expected
    with pytest.raises(FileNotFoundError, match="no usr/share/libreoffice/help/en-US/text/"):
        help_pages(tmp_path / "pkg", "en-US")
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed: the .deb reader is not checked against a real package")
    (tmp_path / "pkg" / "DEBIAN").mkdir()
    (tmp_path / "pkg" / "DEBIAN" / "control").write_text(
        "Package: help-test\nVersion: 1\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: t\n"
    )
    deb = tmp_path / "help-test.deb"
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(tmp_path / "pkg"), str(deb)], check=True, capture_output=True
    )
    assert help_pages(deb, "zh-TW") == expected
    with pytest.raises(ValueError, match="not a Debian package"):
        help_pages(tree / "a.html", "zh-TW")


def test_load_pairs_names_the_file_line_and_key(tmp_path):
    good = {"tc": "甲乙", "en": "ab", "page": "p", "id": "par_id1", "split": "test"}
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "en": ""}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: 'en' must be a non-empty string"):
        load_pairs(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "split": "train"}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: split='train': expected one of dev, test"):
        load_pairs(path)
    path.write_text(json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="no pairs in the dev split"):
        load_pairs(path, "dev")


def test_the_shipped_set_holds_what_its_stats_say_and_nothing_trained_on():
    """Recomputed from the file and the default data config's training split: the counts of the stats file, each
    page in the split its hash gives, and no side sharing 24 characters with the text any stage trains on."""
    from bailong.cache import default_cache_dir
    from bailong.data.config import data_config_from_yaml
    from bailong.data.prepare import prepare_text

    pairs = load_pairs(SHIPPED)
    stats = json.loads(SHIPPED.with_name("libreoffice_help.stats.json").read_text())
    for split in ("dev", "test"):
        members = [p for p in pairs if p["split"] == split]
        assert stats["written"][split] == {
            "pairs": len(members),
            "pages": len({p["page"] for p in members}),
            "tc_chars": sum(len(p["tc"]) for p in members),
            "en_chars": sum(len(p["en"]) for p in members),
        }
    assert all(p["split"] == assign_split(p["page"]) for p in pairs)
    assert len({p["tc"] for p in pairs}) == len({p["en"] for p in pairs}) == len(pairs)
    prepared = prepare_text(
        data_config_from_yaml(ROOT / "conf/data/pretrain_tc.yaml", ROOT / "data"), default_cache_dir()
    )
    kept, counts = drop_trained(
        pairs, prepared.documents("tc", "train"), prepared.documents("en", "train"), span=stats["span"]
    )
    assert len(kept) == len(pairs), counts


@pytest.fixture(scope="module")
def mini():
    return AutoModelForCausalLM.from_pretrained(MINI).eval(), AutoTokenizer.from_pretrained(MINI)


def context(mini, tmp_path, **parallel) -> EvalContext:
    model, tok = mini
    settings = ParallelConfig(file=str(SHIPPED), **parallel)
    return EvalContext(model=model, tokenizer=tok, out_dir=tmp_path, eval=EvalConfig(batch_size=4), parallel=settings)


def test_information_parity_is_the_english_bits_over_the_traditional_bits(mini, tmp_path):
    metrics = run_evaluators(["parallel_bpc"], context(mini, tmp_path, max_pairs=12))
    pairs = load_pairs(SHIPPED, "test")[:12]
    model, tok = mini
    tc = bits_per_char(model, tok, [p["tc"] for p in pairs])
    en = bits_per_char(model, tok, [p["en"] for p in pairs])
    assert metrics["parallel/n"] == 12
    assert metrics["parallel/tc_bpc"] == pytest.approx(tc["bpc"], rel=1e-6)
    assert metrics["parallel/en_bpc"] == pytest.approx(en["bpc"], rel=1e-6)
    assert metrics["parallel/information_parity"] == pytest.approx(en["bits"] / tc["bits"], rel=1e-6)
    assert metrics["parallel/tc_tokens_per_char"] == pytest.approx(tc["tokens_per_char"], rel=1e-9)


def test_translation_scores_the_first_line_of_each_answer_by_chrf(mini, tmp_path):
    metrics = run_evaluators(["translation"], context(mini, tmp_path, translate_pairs=3, max_new_tokens=12))
    records = [r for _, r in read_jsonl(tmp_path / "translation" / "generations.jsonl")]
    assert len(records) == 6 and metrics["translation/n"] == 3
    pairs = load_pairs(SHIPPED, "test")[:3]
    for direction, source, target in (("en2tc", "en", "tc"), ("tc2en", "tc", "en")):
        mine = [r for r in records if r["direction"] == direction]
        assert [r["source"] for r in mine] == [p[source] for p in pairs]
        assert [r["reference"] for r in mine] == [p[target] for p in pairs]
        assert all(r["hypothesis"] == first_line(r["answer"]) for r in mine)
        chrf = sacrebleu.corpus_chrf([r["hypothesis"] for r in mine], [[p[target] for p in pairs]]).score
        assert metrics[f"translation/{direction}_chrf"] == pytest.approx(chrf, rel=1e-12)
        assert 0 <= metrics[f"translation/{direction}_lang"] <= 1


def test_first_line_skips_leading_blank_lines():
    assert first_line("\n  \n 選取樣式。\n下一行") == "選取樣式。" and first_line("") == ""


def test_parallel_settings_are_checked_with_the_key(tmp_path):
    from bailong.checks import ConfigError, check_config

    with pytest.raises(ConfigError, match=r"parallel.split='train': expected one of dev, test"):
        check_config(compose_config(["parallel.split=train"], tmp_path))
    with pytest.raises(ConfigError, match=r"parallel.translate_pairs=0: expected an integer >= 1"):
        check_config(compose_config(["parallel.translate_pairs=0"], tmp_path))
