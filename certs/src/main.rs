//! `nixq-certs`: create the deployment CA, issue agent and master
//! certificates, pack them per host, and inspect certificate files.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use nixq_certs::files::read_pem_file;
use nixq_certs::{pki, CertInfo, CertsError, HostRole, Overwrite, PkiDir, Validity};

/// Certificates for nixq: one CA per deployment signs a server certificate
/// for every agent (build slave) and a client certificate for every master.
/// Both sides check that the other's certificate comes from that CA, so no
/// ssh keys are needed.
///
/// Typical use, on the machine that keeps the CA:
///
///   nixq-certs init
///   nixq-certs issue agent slave1 --dns slave1.example.org --ip 10.0.0.11
///   nixq-certs issue master hydra
///   nixq-certs bundle slave1     # copy slave1.tar to slave1, tar -xf slave1.tar -C /etc
///   nixq-certs bundle hydra      # copy hydra.tar to the master, same
///
/// Files under --dir: ca.crt, ca.key (keep it secret: whoever has it can
/// make certificates), agents/NAME.crt|.key, masters/NAME.crt|.key. Keys are
/// written with mode 0600; existing files are never overwritten without
/// --force.
#[derive(Debug, Parser)]
#[command(name = "nixq-certs", version, verbatim_doc_comment)]
struct Cli {
    /// Directory of the CA and the issued certificates. It is created (mode
    /// 0700) when missing.
    #[arg(
        long,
        global = true,
        env = "NIXQ_PKI_DIR",
        default_value = "/etc/nixq/pki"
    )]
    dir: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the deployment CA: DIR/ca.crt (give it to every host) and
    /// DIR/ca.key (never leaves this machine).
    Init {
        /// The CA's name, shown as the issuer of every certificate.
        #[arg(long, default_value = "nixq CA")]
        name: String,
        /// How long the CA is valid, in days. Every certificate it signed
        /// stops working when it expires, so make it long.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace an existing CA. Certificates signed by the old one will no
        /// longer be accepted anywhere the new ca.crt is installed.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the CA.
    #[command(subcommand)]
    Issue(Issue),
    /// Write NAME.tar with what host NAME needs: ca.crt, its certificate and
    /// key (mode 0600), and an example configuration. Unpack it on the host
    /// with `tar -xf NAME.tar -C /etc` (files land in /etc/nixq/).
    Bundle {
        /// The agent or master to pack (its certificate must exist in DIR).
        name: String,
        /// Needed only if NAME is both an agent and a master.
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
        /// Where to write the archive (default: NAME.tar in the current
        /// directory). It holds a private key, so it is created mode 0600.
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Replace an existing archive.
        #[arg(long)]
        force: bool,
    },
    /// Print what a certificate is: subject, issuer, role (agent, master,
    /// CA), SANs, validity (and whether it has expired), SHA-256
    /// fingerprint. Reads the first certificate of each PEM FILE.
    Show {
        /// Certificate files (a combined cert+key file works too).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum Issue {
    /// A server certificate for the agent NAME (a build slave). Masters
    /// connect to it as nixq://HOST[:PORT], and HOST must be one of the
    /// --dns names or --ip addresses given here (default: NAME itself as a
    /// DNS name).
    Agent {
        /// The agent's name: the certificate's CN and the file name
        /// (letters, digits, '-', '.').
        name: String,
        /// A DNS name masters use for this agent (repeatable).
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// An IP address masters use for this agent (repeatable).
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        /// Validity in days. Short enough that a leaked key ages out, long
        /// enough not to be a chore: about two years.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace an existing certificate and key of this name.
        #[arg(long)]
        force: bool,
    },
    /// A client certificate for the master NAME (a machine whose Nix hands
    /// builds to agents). Agents may restrict which master names they accept.
    Master {
        /// The master's name: the certificate's CN and the file name
        /// (letters, digits, '-', '.').
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace an existing certificate and key of this name.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoleArg {
    Agent,
    Master,
}

impl From<RoleArg> for HostRole {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Agent => Self::Agent,
            RoleArg::Master => Self::Master,
        }
    }
}

fn overwrite(force: bool) -> Overwrite {
    if force {
        Overwrite::Replace
    } else {
        Overwrite::Refuse
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixq-certs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), CertsError> {
    let dir = PkiDir::new(cli.dir);
    match cli.command {
        Command::Init { name, days, force } => {
            let w = pki::init(
                &dir,
                &name,
                Validity::days_from_now(days)?,
                overwrite(force),
            )?;
            report(&w);
            println!("next: nixq-certs issue agent NAME --dns HOST, nixq-certs issue master NAME");
        }
        Command::Issue(Issue::Agent {
            name,
            dns,
            ips,
            days,
            force,
        }) => {
            let validity = Validity::days_from_now(days)?;
            let w = pki::issue_agent(&dir, &name, &dns, &ips, validity, overwrite(force))?;
            report(&w);
            println!("next: nixq-certs bundle {name}");
        }
        Command::Issue(Issue::Master { name, days, force }) => {
            let validity = Validity::days_from_now(days)?;
            let w = pki::issue_master(&dir, &name, validity, overwrite(force))?;
            report(&w);
            println!("next: nixq-certs bundle {name}");
        }
        Command::Bundle {
            name,
            role,
            out,
            force,
        } => {
            let role = pki::find_role(&dir, &name, role.map(HostRole::from))?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.tar")));
            let mtime = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let w = pki::bundle(&dir, &name, role, &out, overwrite(force), mtime)?;
            report(&w);
            println!(
                "next: copy {} to {name} and run `tar -xf {} -C /etc` there",
                w.cert.display(),
                file_name(&w.cert)
            );
        }
        Command::Show { files } => {
            let now = SystemTime::now();
            for (i, file) in files.iter().enumerate() {
                let text = read_pem_file(file)?;
                let info = CertInfo::from_pem(text.as_bytes(), &file.display().to_string())?;
                if i > 0 {
                    println!();
                }
                println!("file:        {}", file.display());
                print!("{}", info.render(now));
            }
        }
    }
    Ok(())
}

fn report(w: &pki::Written) {
    println!("wrote {}", w.cert.display());
    if let Some(key) = &w.key {
        println!("wrote {} (mode 0600, keep it secret)", key.display());
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}
