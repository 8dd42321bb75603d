"""The simulated Xen host: xensim, xenstored launcher, toolstack, simulated guests."""
