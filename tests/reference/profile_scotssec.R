## lme4's profile confidence intervals for ScotsSec, attain ~ verbal * sex + (1 | primary) + (1 | second)
## (REML fit; confint(method = "profile") profiles the ML deviance), for tests/test_profile.py.
##
## Usage (from the repository root):
##   Rscript tests/reference/profile_scotssec.R      # -> tests/reference/profile_scotssec.json
##
## The data are mixedjax's bundled copy (mixedjax/datasets/ScotsSec.csv, mlmRev 1.0-8) with R's level
## order from mixedjax/datasets/factor_levels.json.  The fit uses tight BOBYQA tolerances so that the ML
## optimum behind the profile is polished (lme4's default stopping rule is ~1e-6 in the deviance).
## Fixed-effect rows carry lme4's names (sexF, verbal:sexF); the test compares them by position.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})
if (!file.exists("mixedjax/datasets/factor_levels.json")) stop("run from the repository root")
meta <- fromJSON("mixedjax/datasets/factor_levels.json", simplifyVector = FALSE)$ScotsSec
d <- read.csv("mixedjax/datasets/ScotsSec.csv", colClasses = c("numeric", "numeric", "character", "character",
                                                               "numeric", "character"))
for (col in names(meta$factors)) d[[col]] <- factor(d[[col]], levels = unlist(meta$factors[[col]]$levels))
stopifnot(nrow(d) == meta$rows)

tight <- lmerControl(optimizer = "nloptwrap",
                     optCtrl = list(xtol_abs = 1e-14, ftol_abs = 1e-15, xtol_rel = 0, ftol_rel = 0, maxeval = 1e5))
fit <- lmer(attain ~ verbal * sex + (1 | primary) + (1 | second), data = d, REML = TRUE, control = tight)
t0 <- Sys.time()
ci <- confint(fit, method = "profile", oldNames = FALSE)
elapsed <- as.numeric(Sys.time() - t0, units = "secs")
fmt <- function(x) I(as.numeric(sprintf("%.17g", x)))
out <- list(
  call = "lmer(attain ~ verbal * sex + (1 | primary) + (1 | second), data = ScotsSec, REML = TRUE); confint(fit, method = 'profile', oldNames = FALSE)",
  lme4_version = as.character(packageVersion("lme4")), R_version = R.version.string,
  logLik_reml = as.numeric(logLik(fit)),
  confint_profile = list(parameters = I(rownames(ci)), lower = fmt(ci[, 1]), upper = fmt(ci[, 2]), level = 0.95,
                         time_s = elapsed))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE, na = "null"),
           "tests/reference/profile_scotssec.json")
print(ci, digits = 10)
