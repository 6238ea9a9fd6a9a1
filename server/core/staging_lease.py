"""The staging leases of a cluster node: renew this node's, take over a dead node's.

With ``[cluster] database`` every staging record lives in the shared database
(:mod:`.staging`) and carries a lease. A live node proves it is alive by renewing the
leases of all its records every third of a lease; a node that stops renewing (killed,
frozen, cut off from the database) lets them run out, and then one surviving node
takes them over (:meth:`StagingRecords.take_over` gives each to one claimant) and
settles them as that node's own restart would have:

- an upload still receiving bytes (``upload``) is discarded: its client was on the dead
  node, so it already saw the transfer fail and retries; the previous version of the
  file is untouched and the staging file is removed;
- an upload whose pre-publish checks were running (``check``) is checked again here
  (every pre-publish binding runs on this node) and published only if they pass
  (with ``[uploads] on_restart = "discard"``, discarded like the others).

One thread per node; on a single node (SQLite) there is nobody to take over from and
nothing runs.
"""

from __future__ import annotations

import logging
import threading

from scriptsftp.server.core.publish import Publisher
from scriptsftp.server.core.staging import CHECKING, StagingRecords, discard_record
from scriptsftp.server.core.storage import StorageOpener

log = logging.getLogger("scriptsftp.staging")


class LeaseKeeper:
    """Renews this node's staging leases and settles the records of dead nodes."""

    def __init__(self, records: StagingRecords, publisher: Publisher, open_storage: StorageOpener,
                 *, recheck: bool = True) -> None:
        self.records = records
        #: ``[uploads] on_restart``: "recheck" (True) or "discard" a dead node's upload mid-check
        self.recheck = recheck
        self.publisher = publisher
        self.open_storage = open_storage
        #: a third of a lease: two renewals may fail (a database hiccup) before it runs out
        self.interval = max(0.2, records.lease / 3)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="staging-leases", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except self.records.errors as exc:
                if not self.failing:  # once per outage, not every tick
                    log.error("staging leases: the shared database failed (%s); retrying", exc)
                self.failing = True
            except Exception:
                log.exception("staging leases: unexpected failure")

    def tick(self) -> tuple[int, int]:
        """Renew, then take over what expired: (uploads discarded, uploads rechecked)."""
        self.records.renew()
        if self.failing:
            log.warning("staging leases: the shared database answers again")
            self.failing = False
        taken = self.records.take_over()
        recheck = [r for r in taken if self.recheck and r.state == CHECKING and r.event is not None]
        discarded = 0
        for rec in taken:
            if rec in recheck:
                continue
            discard_record(self.records, rec, self.open_storage)
            discarded += 1
            log.warning("discarded upload %s/%s of node %s, which stopped mid-transfer (lease expired)",
                        rec.directory.rstrip("/"), rec.final_name, rec.node)
        for rec in recheck:
            log.warning("checking again upload %s/%s of node %s, which stopped mid-check (lease expired)",
                        rec.directory.rstrip("/"), rec.final_name, rec.node)
        started = self.publisher.recheck(recheck, why="after its node stopped") if recheck else 0
        return discarded, started
