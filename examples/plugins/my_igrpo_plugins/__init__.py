"""An example plug-in package for nemo-igrpo: a policy loss, an advantage estimator and a loss
aggregation, selected from the config by import path, with no change to nemo-igrpo itself.

    PYTHONPATH=examples/plugins igrpo train conf/demo.yaml \\
        algorithm.policy_loss=my_igrpo_plugins.losses:unclipped_pg \\
        algorithm.advantage=my_igrpo_plugins.advantages:rank_advantage \\
        algorithm.loss_aggregation=my_igrpo_plugins.losses:seq_mean_token_sqrt

(or `pip install -e` a package of your own that holds the same functions). The config is
checked when it is loaded: the module is imported and each function's signature is checked
against what the trainer passes, so a typo fails in a second, naming the key.
"""
