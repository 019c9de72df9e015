"""jobs.ray_train.Watchdog: a stuck training loop (no epoch reported) is logged, a live one is not."""

from __future__ import annotations

import logging
import time

from jobs.ray_train import Watchdog


def test_watchdog_warns_when_no_epoch_is_reported_and_stays_quiet_while_beating(caplog, capfd):
    log = logging.getLogger("wsseg.test_watchdog")
    with caplog.at_level(logging.WARNING, logger="wsseg.test_watchdog"):
        alive = Watchdog(0.3, label="alive", log=log, poll_s=0.02).start()
        stuck = Watchdog(0.3, label="stuck", log=log, poll_s=0.02).start()
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:  # 'alive' reports every 0.05 s, 'stuck' never
            alive.beat()
            time.sleep(0.05)
        alive.stop()
        stuck.stop()
    msgs = [r.getMessage() for r in caplog.records]
    assert alive.warnings == 0 and not any(m.startswith("alive") for m in msgs)
    # 1 s idle with a 0.3 s limit: warned once at ~0.3 s, again ~0.3 s later (not every poll).
    assert 2 <= stuck.warnings <= 4
    assert any(m.startswith("stuck: no epoch reported") and "WSSEG_TRAIN_WATCHDOG_S" in m for m in msgs)
    err = capfd.readouterr().err  # the thread stacks were dumped, the watchdog's own among them
    assert "most recent call first" in err and "in _run" in err
