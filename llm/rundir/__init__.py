"""Who owns a run dir: the claim and its lock (`owner`), the check that a dir a run must write is writable
(`writable`), and the Hydra side (`resolvers`: the job's claim, the dir-name and `.hydra/` resolvers)."""
