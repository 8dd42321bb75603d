"""tapback: XenStore watch events -> per-VBD machines -> effects.

The daemon (`daemon.Tapback`) watches `backend/vbd3` and runs one
`blktap3.fsm.BackendVbd` per VBD in its own worker (`vbd.VbdWorker`); `tapdisks`
finds a VBD's tapdisk from `physical-device-path` and reports tapdisk deaths;
`images` notices an image reopened by `tap-ctl resize`; `service` starts and stops
the daemon as a background process; `main` is the `tapback` command.
"""
