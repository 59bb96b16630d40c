## Fit every data set in sim_rs_data.csv.gz with lme4 and store the optima.
##
## Usage (from the repository root):
##   Rscript tests/reference/fit_sim_rs.R
##
## Fresh lmer() fits per data set (NOT refit(): lme4 1.1-31's
## refit(newresp=) misreports the REML logLik).
##   reml         : REML, nloptwrap/BOBYQA with tight tolerances
##   reml_default : REML, default lmerControl()
##   ml           : ML,   nloptwrap/BOBYQA with tight tolerances
##   reml_best / ml_best : cross-check, see below
## theta is lme4's relative covariance factor (lower triangle of the
## Cholesky factor of Var(b)/sigma^2, column-major: L11, L21, L22).

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = FALSE)
fa <- sub("^--file=", "", args[grep("^--file=", args)])
here <- if (length(fa)) dirname(normalizePath(fa)) else "tests/reference"

dat <- read.csv(file.path(here, "sim_rs_data.csv.gz"),
                colClasses = c(dataset = "integer", g = "character",
                               x = "numeric", y = "numeric",
                               kind = "character"))
dat$g <- factor(dat$g, levels = as.character(0:17))

tight <- lmerControl(optimizer = "nloptwrap",
                     optCtrl = list(algorithm = "NLOPT_LN_BOBYQA",
                                    xtol_abs = 1e-14, ftol_abs = 1e-15,
                                    xtol_rel = 0, ftol_rel = 0,
                                    maxeval = 1e6),
                     calc.derivs = FALSE)

call_str <- paste0(
  "lmer(y ~ x + (1 + x | g), data = d, REML = TRUE, ",
  "control = lmerControl(optimizer = \"nloptwrap\", ",
  "optCtrl = list(algorithm = \"NLOPT_LN_BOBYQA\", xtol_abs = 1e-14, ",
  "ftol_abs = 1e-15, xtol_rel = 0, ftol_rel = 0, maxeval = 1e6), ",
  "calc.derivs = FALSE)); reml_default: same with REML = TRUE and ",
  "control = lmerControl(); ml: same tight control with REML = FALSE")

msgs <- function(fit) {
  m <- c(fit@optinfo$conv$lme4$messages, fit@optinfo$warnings)
  as.character(unlist(m))
}

summ <- function(fit, w) {
  list(logLik = as.numeric(logLik(fit)),
       theta = unname(as.numeric(getME(fit, "theta"))),
       fixef = unname(as.numeric(fixef(fit))),
       sigma = sigma(fit),
       singular = isSingular(fit),
       feval = fit@optinfo$feval,
       messages = I(unique(c(msgs(fit), w))))
}

fitw <- function(...) {
  w <- character(0)
  fit <- withCallingHandlers(
    suppressMessages(lmer(...)),
    warning = function(cw) {
      w <<- c(w, conditionMessage(cw))
      invokeRestart("muffleWarning")
    })
  list(fit = fit, warnings = w)
}

## Cross-check of the optimum: nloptwrap/BOBYQA can stop at the saddle
## theta[1] = L11 = 0 (the deviance is even in (L11, L21) and the bound
## L11 >= 0 blocks the way out).  So each model is also fitted with
## minqa::bobyqa, Nelder_Mead, and the tight nloptwrap control from several
## starting values; the best of these (and of the main fit) is polished by
## one more tight nloptwrap run started there and stored as reml_best/ml_best,
## with "source" naming where it came from and "gain" = its logLik minus
## the main fit's.  Use reml_best$logLik as the bar to not end below.
alt_ctrl <- list(
  minqa_bobyqa = lmerControl(optimizer = "bobyqa",
                             optCtrl = list(rhoend = 1e-12, maxfun = 1e6),
                             calc.derivs = FALSE),
  Nelder_Mead = lmerControl(optimizer = "Nelder_Mead",
                            optCtrl = list(FtolAbs = 1e-15, FtolRel = 1e-15,
                                           XtolRel = 1e-12, maxfun = 1e6),
                            calc.derivs = FALSE))
starts <- list(c(1, 0.5, 0.5), c(1, -0.5, 0.5), c(0.2, 0.2, 0.2),
               c(0.2, -0.2, 0.2), c(2, 1, 1), c(2, -1, 1))

best_of <- function(d, reml, main) {
  cands <- list(main = main)
  for (nm in names(alt_ctrl))
    cands[[nm]] <- fitw(y ~ x + (1 + x | g), data = d, REML = reml,
                        control = alt_ctrl[[nm]])$fit
  for (k in seq_along(starts))
    cands[[paste0("nloptwrap_start", k)]] <-
      fitw(y ~ x + (1 + x | g), data = d, REML = reml, control = tight,
           start = list(theta = starts[[k]]))$fit
  ll <- sapply(cands, function(f) as.numeric(logLik(f)))
  b <- which.max(ll)
  pol <- fitw(y ~ x + (1 + x | g), data = d, REML = reml, control = tight,
              start = list(theta = unname(getME(cands[[b]], "theta"))))
  fit <- if (as.numeric(logLik(pol$fit)) >= ll[b]) pol$fit else cands[[b]]
  s <- summ(fit, character(0))
  s$messages <- NULL
  s$feval <- NULL
  s$source <- names(cands)[b]
  s$gain <- s$logLik - as.numeric(logLik(main))
  s
}

ids <- sort(unique(dat$dataset))
out <- vector("list", length(ids))
for (k in seq_along(ids)) {
  i <- ids[k]
  d <- dat[dat$dataset == i, ]
  r  <- fitw(y ~ x + (1 + x | g), data = d, REML = TRUE,  control = tight)
  rd <- fitw(y ~ x + (1 + x | g), data = d, REML = TRUE,  control = lmerControl())
  m  <- fitw(y ~ x + (1 + x | g), data = d, REML = FALSE, control = tight)
  out[[k]] <- list(dataset = i, kind = d$kind[1],
                   reml = summ(r$fit, r$warnings),
                   reml_default = summ(rd$fit, rd$warnings),
                   ml = summ(m$fit, m$warnings),
                   reml_best = best_of(d, TRUE, r$fit),
                   ml_best = best_of(d, FALSE, m$fit))
}

res <- list(
  software = list(R = R.version.string,
                  lme4 = as.character(packageVersion("lme4")),
                  Matrix = as.character(packageVersion("Matrix")),
                  nloptr = as.character(packageVersion("nloptr")),
                  jsonlite = as.character(packageVersion("jsonlite"))),
  call = call_str,
  datasets = out)

## jsonlite rounds doubles to at most 15 significant digits, so every double
## is written verbatim with "%.17g" (exact round trip).
full_prec <- function(x) {
  if (is.list(x)) {
    nm <- names(x)
    x <- lapply(x, full_prec)
    names(x) <- nm
    return(x)
  }
  if (is.double(x) && !inherits(x, "AsIs")) {
    if (!all(is.finite(x))) stop("non-finite value")
    s <- sprintf("%.17g", x)
    if (length(x) != 1L) s <- paste0("[", paste(s, collapse = ", "), "]")
    return(structure(s, class = "json"))
  }
  x
}

outfile <- file.path(here, "sim_rs_lme4.json")
writeLines(toJSON(full_prec(res), auto_unbox = TRUE, json_verbatim = TRUE,
                  pretty = TRUE), outfile)

sing <- sapply(out, function(o) o$reml$singular)
cat(sprintf("wrote %s: %d data sets; REML (tight) singular: %d\n",
            outfile, length(out), sum(sing)))
print(table(kind = sapply(out, `[[`, "kind"), singular = sing))
dd <- sapply(out, function(o) o$reml$logLik - o$reml_default$logLik)
cat(sprintf("REML tight - default logLik: min %.3g, max %.3g\n",
            min(dd), max(dd)))
for (w in c("reml", "ml")) {
  gn <- sapply(out, function(o) o[[paste0(w, "_best")]]$gain)
  cat(sprintf("%s_best gain over %s: max %.6g; > 1e-6 in data sets: %s\n",
              w, w, max(gn), paste(ids[gn > 1e-6], collapse = " ")))
}
