"""tapdisk control protocol, libblktapctl client and the tap-ctl command."""
