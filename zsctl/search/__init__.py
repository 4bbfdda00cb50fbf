"""Search engines behind one small interface; `make_engine(spec)` turns a search spec into one."""
