"""Built-in tk plugins, loaded through the "tk" entry-point group like any other."""
