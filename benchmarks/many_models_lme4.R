# lme4 side of benchmarks/many_models.py: many responses on one design.
#
# Usage: Rscript benchmarks/many_models_lme4.R DATA.csv N_REFIT N_FRESH OUT_PREFIX
#
# DATA.csv has columns g, x, y0, y1, ... (one response per column, all on the same
# 18-group design).  The script
#   1. fits y0 with lmer(y ~ x + (1 + x | g), REML = TRUE)          (not timed),
#   2. times a loop of refit(fit, newresp = y_m) over the first N_REFIT responses,
#   3. times a loop of fresh lmer() fits over the first N_FRESH responses,
# and writes
#   OUT_PREFIX_fits.csv : m, logLik and fixed effects of refit() and of fresh lmer()
#   OUT_PREFIX_info.txt : "key value" lines (timings, versions, counts).
# Messages about singular fits are silenced (and counted with isSingular()).

suppressPackageStartupMessages(library(lme4))

args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 4) stop("usage: many_models_lme4.R DATA.csv N_REFIT N_FRESH OUT_PREFIX")
dat <- read.csv(args[1])
n_refit <- as.integer(args[2])
n_fresh <- as.integer(args[3])
out <- args[4]
ycols <- grep("^y[0-9]+$", names(dat), value = TRUE)
stopifnot(length(ycols) >= max(n_refit, n_fresh))
dat$g <- factor(dat$g)

d0 <- data.frame(g = dat$g, x = dat$x, y = dat[[ycols[1]]])
fit0 <- suppressMessages(lmer(y ~ x + (1 + x | g), data = d0, REML = TRUE))

# refit() loop
refit_ll <- rep(NA_real_, n_refit)
refit_b <- matrix(NA_real_, n_refit, 2)
refit_sing <- 0L
t0 <- proc.time()
for (m in seq_len(n_refit)) {
  f <- suppressMessages(refit(fit0, newresp = dat[[ycols[m]]]))
  refit_ll[m] <- as.numeric(logLik(f))
  refit_b[m, ] <- fixef(f)
  refit_sing <- refit_sing + isSingular(f)
}
t_refit <- proc.time() - t0

# fresh lmer() loop
fresh_ll <- rep(NA_real_, n_refit)
fresh_b <- matrix(NA_real_, n_refit, 2)
fresh_sing <- 0L
fresh_warn <- 0L
t0 <- proc.time()
for (m in seq_len(n_fresh)) {
  d <- data.frame(g = dat$g, x = dat$x, y = dat[[ycols[m]]])
  f <- withCallingHandlers(
    suppressMessages(lmer(y ~ x + (1 + x | g), data = d, REML = TRUE)),
    warning = function(w) {
      fresh_warn <<- fresh_warn + 1L
      invokeRestart("muffleWarning")
    })
  fresh_ll[m] <- as.numeric(logLik(f))
  fresh_b[m, ] <- fixef(f)
  fresh_sing <- fresh_sing + isSingular(f)
}
t_fresh <- proc.time() - t0

write.csv(data.frame(m = seq_len(n_refit) - 1L,
                     refit_llf = refit_ll, refit_b0 = refit_b[, 1], refit_b1 = refit_b[, 2],
                     fresh_llf = fresh_ll, fresh_b0 = fresh_b[, 1], fresh_b1 = fresh_b[, 2]),
          paste0(out, "_fits.csv"), row.names = FALSE)

blas <- tryCatch(extSoftVersion()[["BLAS"]], error = function(e) "unknown")
lapack <- tryCatch(La_library(), error = function(e) "unknown")
info <- c(
  paste("r_version", gsub(" ", "_", R.version.string)),
  paste("lme4_version", as.character(packageVersion("lme4"))),
  paste("blas", if (nzchar(blas)) blas else "unknown"),
  paste("lapack", if (nzchar(lapack)) lapack else "unknown"),
  paste("n_refit", n_refit),
  paste("refit_elapsed_s", unname(t_refit["elapsed"])),
  paste("refit_cpu_s", unname(t_refit["user.self"] + t_refit["sys.self"])),
  paste("refit_singular", refit_sing),
  paste("n_fresh", n_fresh),
  paste("fresh_elapsed_s", unname(t_fresh["elapsed"])),
  paste("fresh_cpu_s", unname(t_fresh["user.self"] + t_fresh["sys.self"])),
  paste("fresh_singular", fresh_sing),
  paste("fresh_warnings", fresh_warn)
)
writeLines(info, paste0(out, "_info.txt"))
cat(info, sep = "\n")
