"""The tasks a run can be: each conf/task/*.yaml names its entry here. `config`: building objects from the config and
checking every key before any work."""
