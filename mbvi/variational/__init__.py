"""The variational maths: posteriors and priors, the trajectory objective (Eq. 6-7,
Eq. 16 at H = 0), model rollouts, and the contracts of world models and value
estimates.  Plain torch: nothing here imports Lightning, Gymnasium or MLflow."""
