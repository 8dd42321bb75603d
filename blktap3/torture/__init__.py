"""``blktap3-torture``: long, hostile, faulty runs of the back-end, each bounded, each
printing its figures and failing when anything was lost, wrong, crashed, hung or leaked.

- ``ring``: a hostile guest ring against the ASan+UBSan data path, a verifying one beside
  it (``ring``);
- ``kill``: SIGKILL of the tapdisk under a flushed write load, every acknowledged and
  flushed block checked after reattaching (``kill``);
- ``pause``: pause/resume (and resume on a swapped image) under a verifying load
  (``pause``);
- ``churn``: guests created and destroyed mid-I/O, tapback and xenstored SIGKILLed and
  restarted; nothing may leak, the next guest must connect (``churn``);
- ``faults``: EIO, ENOSPC, short writes, slow I/O and failed fsyncs under tapdisk,
  through a FUSE layer (``faultfs``); every answer to the guest judged (``faults``);
- ``powercut``: power cuts that drop unsynced writes at random, raw and VHD images
  checked after each (``powercut``);
- ``soak``: guests with two disks each connecting, verifying and detaching for hours,
  tap-ctl stats/pause/unpause from outside; memory and descriptors sampled, flat
  (``soak``).

Each module runs one of them and returns a ``Verdict`` (``verdict``); ``cli`` is the
command.
"""
