"""A shortened churn soak (``benchmarks/soak.py``): a whole local swarm keeps training and
generating while trainers and servers are SIGKILLed or SIGTERMed and restarted."""

from __future__ import annotations

from benchmarks.soak import Soak, SoakConfig, markdown


def test_churn_loses_no_image_no_published_step_and_leaves_nothing(small_run, tmp_path):
    cfg = SoakConfig(
        workdir=str(tmp_path / "soak"), minutes=2.0, kill_every=(20.0, 30.0), min_kills=3, prepared=str(small_run)
    )
    report = Soak(cfg).run()
    text = markdown(report, "test")
    (tmp_path / "soak.md").write_text(text)  # kept by pytest for a look after a run
    assert len(report.kills) >= 3, text
    assert report.requested >= 2 and report.completed == report.requested, text
    assert report.left_behind == [], text
    assert report.crashes == [], text
    for k in report.kills:
        # Stopped by itself (8 nodes share 2 cores here, so the 10 s promise is checked in test_stop).
        assert k.signal != "SIGTERM" or k.stop_s is not None, text
        if k.job and k.resumed is not None:  # the job went on from the checkpoint published before the kill
            assert k.resumed >= k.published, text
