"""The top floor: the `stamen` command line, the `stamen-supernode` wrapper, and the
studies that read run directories into tables and figures. Nothing below imports it."""
