"""The C data path (cffi): blkif ring service, request checks, io engine, image drivers."""
