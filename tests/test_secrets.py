from collections import Counter

import pytest
import torch

from libortho.privacy import candidate_secrets, make_canaries, measure, secret_pattern
from libortho.secrets import (PHONE, TEMPLATES, frequency_curve, insertion_schedule, make_pii_records, pii_canaries,
                              pii_canary, probe_canaries)


def test_records_are_seeded_distinct_and_formatted():
    a = make_pii_records(100, seed=1)
    assert a == make_pii_records(100, seed=1) and a != make_pii_records(100, seed=2)
    assert len({r.name for r in a}) == 100 and len({r.phone for r in a}) == 100
    assert all(secret_pattern(r.phone) == PHONE for r in a)
    assert all(r.address.split()[0].isdigit() and ", " in r.address for r in a)
    with pytest.raises(ValueError, match="PII records"):
        make_pii_records(0)


def test_pii_canaries_split_at_the_phone_number(tokenizer):
    rec = make_pii_records(20, seed=0)
    for t in range(len(TEMPLATES)):
        for r, c in zip(rec, pii_canaries(tokenizer, rec, t)):
            text = r.text(t)
            assert tokenizer.decode(c.ids) == text and tokenizer.decode(c.secret_ids) == r.phone
            assert c.ids == tokenizer(text, add_special_tokens=False).input_ids  # the tokenizer's own split
            assert r.name in tokenizer.decode(c.prefix_ids) and r.address in tokenizer.decode(c.prefix_ids)
            assert c.fmt == f"pii:{t}" and c.user == r.name
    with pytest.raises(ValueError, match="template"):
        pii_canary(tokenizer, rec[0], len(TEMPLATES))


def test_probes_paraphrase_the_training_text(tokenizer):
    rec = make_pii_records(3, seed=0)
    train = pii_canaries(tokenizer, rec, 0)
    probes = probe_canaries(tokenizer, rec)
    assert sorted(probes) == list(range(1, len(TEMPLATES))) and len(probes) >= 2
    for t, cs in probes.items():
        for c, tr in zip(cs, train):
            assert c.prefix_ids != tr.prefix_ids and c.secret_ids == tr.secret_ids
            # the same candidates for every template of a record: exposures pair across templates
            assert candidate_secrets(c, 30, seed=0) == candidate_secrets(tr, 30, seed=0)
    assert all(secret_pattern(s) == PHONE for s in candidate_secrets(train[0], 30))


def test_the_exposure_machinery_finds_a_trained_phone_number(tokenizer, tiny_model):
    """Four steps on two records' training text put their phone numbers at rank 1 of 64 in the training
    template (6 bits) and past it by the extrapolated exposure; the untrained model (the control) does not."""
    rec = make_pii_records(2, seed=3)
    train = pii_canaries(tokenizer, rec, 0)
    before = measure(tiny_model, tokenizer, train, n_candidates=64)
    opt = torch.optim.Adam(tiny_model.parameters(), lr=2e-2)
    tiny_model.train()
    for _ in range(4):
        loss = sum(tiny_model(input_ids=torch.tensor([c.ids]), labels=torch.tensor([c.ids])).loss for c in train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = measure(tiny_model, tokenizer, train, n_candidates=64)
    assert after.exposures == [6.0, 6.0] and min(after.exposures_ext) > 6.0
    assert before.mean_exposure < 5.0 and max(before.exposures_ext) < 5.0 and before.extraction_rate == 0.0
    probes = measure(tiny_model, tokenizer, probe_canaries(tokenizer, rec)[1], n_candidates=64, extrapolate=False)
    assert all(0 <= e <= 6.0 for e in probes.exposures)  # paraphrases are scored the same way


def test_insertion_schedule_counts_and_training_list(tokenizer):
    cs = make_canaries(tokenizer, 10, seed=0, groups=(4,))
    ins = insertion_schedule(cs, (1, 4, 16, 64), seed=0)
    assert sorted(Counter(ins.counts).values()) == [2, 2, 3, 3]  # 10 over 4 counts
    seen = Counter(c.user for c in ins.sequences)
    assert all(seen[c.user] == k for c, k in zip(cs, ins.counts)) and len(ins.sequences) == sum(ins.counts)
    assert ins == insertion_schedule(cs, (1, 4, 16, 64), seed=0) and ins != insertion_schedule(cs, seed=1)
    assert [c.user for c in ins.sequences[:20]] != sorted(c.user for c in ins.sequences[:20])  # shuffled
    assert ins.by_count()[64] == [i for i, k in enumerate(ins.counts) if k == 64]
    assert ins.to_dict()["sequences_per_epoch"] == sum(ins.counts)
    with pytest.raises(ValueError, match="positive integers"):
        insertion_schedule(cs, (0, 4))
    with pytest.raises(ValueError, match="one canary per count"):
        insertion_schedule(cs[:3], (1, 4, 16, 64))


def test_frequency_curve_groups_by_count(tokenizer):
    cs = make_canaries(tokenizer, 8, seed=0, groups=(4,))
    ins = insertion_schedule(cs, (1, 64), seed=0)
    extracted = [k == 64 for k in ins.counts]
    exposures = [10.0 + i if k == 64 else 1.0 for i, k in enumerate(ins.counts)]
    rows = frequency_curve(ins, extracted, exposures)
    idx64 = ins.by_count()[64]
    assert [r["count"] for r in rows] == [1, 64] and [r["n"] for r in rows] == [4, 4]
    assert rows[0]["extraction_rate"] == 0.0 and rows[1]["extraction_rate"] == 1.0
    assert rows[0]["median_exposure_ci95"] == [1.0, 1.0] and rows[1]["median_exposure_ci95"][0] > 10.0
    # the top canary's extrapolated tail at 1e14 bits moves the median by nothing (a mean would follow it)
    top = max(idx64, key=lambda i: exposures[i])
    tail = [1e14 if i == top else x for i, x in enumerate(exposures)]
    assert frequency_curve(ins, extracted, tail)[1]["median_exposure"] == rows[1]["median_exposure"]
    with pytest.raises(ValueError, match="one result per canary"):
        frequency_curve(ins, extracted[:3], exposures)
